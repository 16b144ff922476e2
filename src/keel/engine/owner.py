"""Who drives a run, and how the others know it is still alive.

Every process that drives a root run holds the claim on the run's queue entry and
renews its lease (`KEEL_LEASE_SECONDS`) from a background thread: a worker, a
server's run thread, and here the process of `keel run` / `keel resume` (or of
`keel.run` in Python). When that process dies, the lease runs out: the run is shown
as "owner lost" and a server or worker that takes runs over continues it by replay.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa

from keel.errors import RunStateError
from keel.status import RunStatus
from keel.store import queue
from keel.store.metadata import MetadataStore
from keel.store.retry import with_retry

# How long a claim on a run or step stays valid without renewal: an owner that dies
# is replaced by another after at most this long.
LEASE_SECONDS = float(os.environ.get("KEEL_LEASE_SECONDS", "30"))

_keepers: dict[int, queue.LeaseKeeper] = {}
_keepers_lock = threading.Lock()


def foreground_id() -> str:
    """The owner name of this process when it drives runs itself (not as a worker)."""
    return f"{socket.gethostname()}:{os.getpid()}:foreground"


def keeper_for(store: MetadataStore) -> queue.LeaseKeeper:
    """This process's lease keeper on `store`: one renewing thread for all its runs."""
    with _keepers_lock:
        keeper = _keepers.get(id(store))
        if keeper is None:
            keeper = _keepers[id(store)] = queue.LeaseKeeper(store, foreground_id(), LEASE_SECONDS)
        return keeper


def owner_process(owner: str | None) -> tuple[str, int] | None:
    """The host and pid in an owner name ("host:pid:role"), if it has them."""
    if not owner:
        return None
    host_pid = owner.rpartition(":")[0]
    host, _, pid = host_pid.rpartition(":")
    return (host, int(pid)) if pid.isdigit() and host else None


def process_gone(host: str | None, pid: int | None) -> bool:
    """True only when the process surely no longer runs (this host, no such pid)."""
    if pid is None or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def dead_owner(lease: queue.RunLease | None) -> str | None:
    """The name of the owner holding `lease` if it is gone: its lease ran out, or its
    process died on this host (then there is no need to wait for the lease)."""
    if lease is None or lease.status != queue.CLAIMED:
        return None
    if lease.lost():
        return lease.owner
    where = owner_process(lease.owner)
    if where is not None and process_gone(*where):
        return lease.owner
    return None


def take(store: MetadataStore, row: Any, *, force: bool = False) -> queue.Claim | None:
    """Claim the run (its row, or the dict of a new one) for this process, or None if
    another live owner holds it (`force`: take it from that owner anyway)."""
    if isinstance(row, dict):
        row = SimpleNamespace(**row)
    lease = with_retry(lambda: queue.run_lease(store, row.id), what=f"reading run {row.id}")
    evict = lease.owner if lease is not None and force else dead_owner(lease)
    return with_retry(
        lambda: queue.take_run(
            store,
            row.id,
            foreground_id(),
            queue=getattr(row, "queue", None) or "default",
            priority=getattr(row, "priority", None) or 0,
            lease_seconds=LEASE_SECONDS,
            evict=evict,
        ),
        what=f"claiming run {row.id}",
    )


@contextmanager
def holding(store: MetadataStore, run_id: str, claim: queue.Claim) -> Iterator[None]:
    """Renew the claim in the background while the body of the `with` drives the run.
    On leaving: the run's entry is marked done if the run ended, and left to its lease
    otherwise (so a crash here makes it a run whose owner is lost)."""
    keeper = keeper_for(store)
    keeper.hold(claim.id)
    try:
        yield
    finally:
        keeper.drop(claim.id)
        _settle(store, run_id, claim, foreground_id())


@contextmanager
def owning(store: MetadataStore, row: Any) -> Iterator[None]:
    """`take` the run (a RunStateError if another live owner holds it), then hold it."""
    claim = take(store, row)
    run_id = row["id"] if isinstance(row, dict) else row.id
    if claim is None:
        holder = queue.run_lease(store, run_id)
        raise RunStateError(
            f"run {run_id} is driven by {holder.owner if holder else 'another process'}",
            run_id=run_id,
            hint="Wait for it, cancel it (keel cancel), or pass --force if that process is gone",
        )
    with holding(store, run_id, claim):
        yield


def _settle(store: MetadataStore, run_id: str, claim: queue.Claim, me: str) -> None:
    """Retire the run's entry if the run has ended (a parked run's entry was re-armed
    by the engine already; a run that did not end keeps its claim until the lease
    runs out, for a taker)."""
    try:
        row = with_retry(lambda: store.get_run(run_id), what=f"reading run {run_id}")
        if row is not None and row.status in (
            RunStatus.SUCCEEDED,
            RunStatus.FAILED,
            RunStatus.CANCELLED,
        ):
            with_retry(lambda: queue.complete(store, claim.id, me), what=f"ending run {run_id}")
    except sa.exc.SQLAlchemyError:
        pass  # the store stayed away: the lease runs out, and a taker finds the run ended
