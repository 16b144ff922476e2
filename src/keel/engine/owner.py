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
from typing import Any

import sqlalchemy as sa

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
    """Claim the run (its row) for this process, or None if another live owner holds
    it (`force`: take it from that owner anyway)."""
    lease = with_retry(lambda: queue.run_lease(store, row.id), what=f"reading run {row.id}")
    evict = lease.owner if lease is not None and force else dead_owner(lease)
    return with_retry(
        lambda: queue.take_run(
            store,
            row.id,
            foreground_id(),
            queue=row.queue or "default",
            priority=row.priority or 0,
            lease_seconds=LEASE_SECONDS,
            evict=evict,
        ),
        what=f"claiming run {row.id}",
    )


def new_entry(run_id: str) -> dict[str, Any]:
    """The queue entry of a run this process records now and drives at once, claimed
    by it from the start (inserted with the run: MetadataStore.insert_run)."""
    return queue.claimed_entry(
        run_id, foreground_id(), queue="default", priority=0, lease_seconds=LEASE_SECONDS
    )


@contextmanager
def holding(store: MetadataStore, run_id: str, item_id: int) -> Iterator[None]:
    """Renew the claim on the run's entry `item_id` in the background while the body
    of the `with` drives the run. On leaving: the entry is marked done if the run
    ended, and left to its lease otherwise (so a crash here makes it a run whose
    owner is lost, for a taker)."""
    keeper = keeper_for(store)
    keeper.hold(item_id)
    try:
        yield
    finally:
        keeper.drop(item_id)
        _settle(store, run_id, item_id, foreground_id())


def _settle(store: MetadataStore, run_id: str, item_id: int, me: str) -> None:
    """Retire the run's entry if the run has ended (a parked run's entry was re-armed
    by the engine already; a run that did not end keeps its claim until the lease
    runs out, for a taker)."""
    try:
        with_retry(lambda: queue.complete_if_ended(store, item_id, me), what=f"ending {run_id}")
    except sa.exc.SQLAlchemyError:
        pass  # the store stayed away: the lease runs out, and a taker finds the run ended
