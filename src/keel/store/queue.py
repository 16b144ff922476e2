"""The shared work queue: enqueue, claim with a lease, renew, complete, hand back.

Claims are single statements that the database makes atomic: on PostgreSQL the
candidate row is locked with `FOR UPDATE SKIP LOCKED`, so any number of workers on
any number of hosts never take the same item; on SQLite the claiming UPDATE runs in
one write transaction, which SQLite serializes. An item whose lease ran out (its
worker died) is claimable again. A pool caps how many claimed items of its name
may be held at once across all workers.

A run's entry is also how the process driving it (a worker, a server thread, the
`keel run` in the foreground) shows it is alive: it holds the entry's claim and
renews the lease. A run whose entry is claimed with a lease that ran out has lost
its owner (`lost_owners`); `claim_lost_run` hands it to exactly one taker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.errors import ConfigError
from keel.store.metadata import MetadataStore
from keel.store.schema import pools, queue_items, runs, workers

QUEUED, CLAIMED, DONE = "queued", "claimed", "done"


@dataclass(frozen=True, slots=True)
class Claim:
    id: int
    kind: str
    run_id: str
    seq: int | None
    attempt: int | None
    queue: str
    pool: str | None
    payload: bytes | None
    claims: int


# What a claim returns, in the order of Claim's fields.
_CLAIM_COLUMNS = (
    queue_items.c.id,
    queue_items.c.kind,
    queue_items.c.run_id,
    queue_items.c.seq,
    queue_items.c.attempt,
    queue_items.c.queue,
    queue_items.c.pool,
    queue_items.c.payload,
    queue_items.c.claims,
)


def _claimed_values(worker_id: str, now: float, lease_seconds: float) -> dict[str, Any]:
    return {
        "status": CLAIMED,
        "claimed_by": worker_id,
        "lease_until": now + lease_seconds,
        "claims": queue_items.c.claims + 1,
    }


def _insert_ignore(
    store: MetadataStore, conn: sa.Connection, rows: Sequence[dict[str, Any]]
) -> None:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    conn.execute(insert(queue_items).on_conflict_do_nothing(index_elements=["dedupe"]), rows)


def _row(
    dedupe: str,
    kind: str,
    run_id: str,
    seq: int | None,
    attempt: int | None,
    queue: str,
    priority: int,
    pool: str | None,
    payload: bytes | None,
    now: float,
    not_before: float | None = None,
) -> dict[str, Any]:
    return {
        "dedupe": dedupe,
        "kind": kind,
        "run_id": run_id,
        "seq": seq,
        "attempt": attempt,
        "queue": queue,
        "priority": priority,
        "pool": pool,
        "not_before": now if not_before is None else not_before,
        "status": QUEUED,
        "claims": 0,
        "payload": payload,
        "created_at": now,
    }


def step_key(run_id: str, seq: int | None, attempt: int | None) -> str:
    """The unique name of one step attempt's queue entry (its row id is not: a row
    id can be reused once its row is collected)."""
    return f"step:{run_id}:{seq}:{attempt}"


def enqueue_run(
    store: MetadataStore,
    run_id: str,
    *,
    queue: str = "default",
    priority: int = 0,
    not_before: float | None = None,
) -> None:
    """Queue a run for a worker to claim (now, or from `not_before`). A run has one queue
    entry, re-armed whenever it is suspended again. Steps are queued with enqueue_steps."""
    now = time.time()
    dedupe = f"run:{run_id}"
    row = _row(dedupe, "run", run_id, None, None, queue, priority, None, None, now, not_before)
    with store.engine.begin() as conn:
        updated = conn.execute(
            queue_items.update()
            .where(queue_items.c.dedupe == dedupe)
            .values(
                status=QUEUED,
                not_before=row["not_before"],
                claimed_by=None,
                lease_until=None,
                queue=queue,
                priority=priority,
            )
        ).rowcount
        if not updated:
            _insert_ignore(store, conn, [row])


@dataclass(frozen=True, slots=True)
class StepItem:
    """One step attempt to queue (see enqueue_steps)."""

    run_id: str
    seq: int
    attempt: int
    queue: str
    priority: int
    pool: str | None
    payload: bytes


def enqueue_steps(store: MetadataStore, items: Sequence[StepItem]) -> None:
    """Queue step attempts in one transaction. An attempt queued already is left as it
    is (a coordinator that resumed after a crash re-submits what was in flight). The
    pools named must exist (check_pool)."""
    if not items:
        return
    now = time.time()
    rows = [
        _row(
            step_key(i.run_id, i.seq, i.attempt),
            "step",
            i.run_id,
            i.seq,
            i.attempt,
            i.queue,
            i.priority,
            i.pool,
            i.payload,
            now,
        )
        for i in items
    ]
    with store.engine.begin() as conn:
        _insert_ignore(store, conn, rows)


def drop_steps(store: MetadataStore, run_id: str) -> None:
    """Remove a run's step attempts from the queue once the run has ended: attempts
    its coordinator no longer waits for, and outcomes no one will collect (those of a
    coordinator that crashed, whose steps a resume queued again as new attempts)."""
    with store.engine.begin() as conn:
        conn.execute(
            queue_items.delete().where(queue_items.c.run_id == run_id, queue_items.c.kind == "step")
        )


def take_queued(store: MetadataStore, keys: Sequence[str]) -> list[str]:
    """Remove the step attempts among `keys` (their step_key) that no worker has
    claimed; returns the keys removed."""
    taken: list[str] = []
    with store.engine.begin() as conn:
        for start in range(0, len(keys), 500):  # well under any bound-parameter limit
            rows = conn.execute(
                queue_items.delete()
                .where(
                    queue_items.c.dedupe.in_(list(keys[start : start + 500])),
                    queue_items.c.status == QUEUED,
                )
                .returning(queue_items.c.dedupe)
            )
            taken += [str(r[0]) for r in rows]
    return taken


def wake_run(store: MetadataStore, run_id: str) -> None:
    """Make a queued (suspended) run claimable now, e.g. when a signal arrives."""
    with store.engine.begin() as conn:
        conn.execute(
            queue_items.update()
            .where(
                queue_items.c.dedupe == f"run:{run_id}",
                queue_items.c.status == QUEUED,
            )
            .values(not_before=time.time())
        )


def _due(now: float) -> Any:
    """Claimable now: queued and due, or claimed by a worker whose lease ran out."""
    return sa.and_(
        queue_items.c.not_before <= now,
        sa.or_(
            queue_items.c.status == QUEUED,
            sa.and_(queue_items.c.status == CLAIMED, queue_items.c.lease_until < now),
        ),
    )


def _candidates(
    store: MetadataStore,
    conn: sa.Connection,
    now: float,
    queues: Sequence[str],
    kinds: Sequence[str],
    full: set[str],
    limit: int,
) -> list[tuple[int, str | None]]:
    """Up to `limit` claimable items, most urgent then oldest first: (id, pool).

    Each queue's queued items are read in the order of ix_keel_queue_pick, and items
    whose lease ran out through ix_keel_queue_lease, so no query sorts the backlog."""
    condition: list[Any] = [queue_items.c.kind.in_(list(kinds)), queue_items.c.not_before <= now]
    if full:
        # Items of pools that are full now are left out of the scan, so a long queue
        # of them (a big backfill) cannot hide the claimable items behind it.
        condition.append(
            sa.or_(queue_items.c.pool.is_(None), queue_items.c.pool.notin_(sorted(full)))
        )
    columns = (queue_items.c.id, queue_items.c.pool, queue_items.c.priority)
    order = (queue_items.c.priority.desc(), queue_items.c.id)
    selects = [
        sa.select(*columns)
        .where(queue_items.c.status == QUEUED, queue_items.c.queue == name, *condition)
        .order_by(*order)
        .limit(limit)
        for name in dict.fromkeys(queues)
    ]
    selects.append(
        sa.select(*columns)
        .where(
            queue_items.c.status == CLAIMED,
            queue_items.c.lease_until < now,
            queue_items.c.queue.in_(list(queues)),
            *condition,
        )
        .order_by(*order)
        .limit(limit)
    )
    found: list[tuple[int, str | None, int]] = []
    for stmt in selects:
        if store.dialect == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        found.extend((i, pool, priority) for i, pool, priority in conn.execute(stmt))
    found.sort(key=lambda item: (-item[2], item[0]))
    return [(i, pool) for i, pool, _ in found[:limit]]


def claim(
    store: MetadataStore,
    worker_id: str,
    queues: Sequence[str],
    *,
    lease_seconds: float,
    kinds: Sequence[str] = ("run", "step"),
    limit_scan: int = 20,
) -> Claim | None:
    """Take the most urgent claimable item of the given queues, or None."""
    now = time.time()
    with store.engine.begin() as conn:
        if store.dialect != "postgresql":
            # Take SQLite's write lock now, so the check and the claim below are one
            # serialized transaction (no other process can claim in between).
            conn.exec_driver_sql("UPDATE keel_queue SET id = id WHERE 0")
        full = _full_pools(conn, now)
        for item_id, pool in _candidates(store, conn, now, queues, kinds, full, limit_scan):
            if pool is not None and (pool in full or not _pool_has_room(store, conn, pool, now)):
                full.add(pool)
                continue
            row = conn.execute(
                queue_items.update()
                .where(queue_items.c.id == item_id)
                .values(**_claimed_values(worker_id, now, lease_seconds))
                .returning(*_CLAIM_COLUMNS)
            ).first()
            if row is not None:
                return Claim(*row)
    return None


def _full_pools(conn: sa.Connection, now: float) -> set[str]:
    held = (
        sa.select(queue_items.c.pool, sa.func.count().label("held"))
        .where(
            queue_items.c.pool.is_not(None),
            queue_items.c.status == CLAIMED,
            queue_items.c.lease_until >= now,
        )
        .group_by(queue_items.c.pool)
        .subquery()
    )
    rows = conn.execute(
        sa.select(pools.c.name)
        .join(held, held.c.pool == pools.c.name)
        .where(held.c.held >= pools.c.slots)
    )
    return {r[0] for r in rows}


def _pool_has_room(store: MetadataStore, conn: sa.Connection, pool: str, now: float) -> bool:
    slots_stmt = sa.select(pools.c.slots).where(pools.c.name == pool)
    if store.dialect == "postgresql":
        # Serialize claimers of one pool: the count below must not change under us.
        slots_stmt = slots_stmt.with_for_update()
    slots = conn.execute(slots_stmt).scalar()
    if slots is None:
        return False
    held = conn.execute(
        sa.select(sa.func.count())
        .select_from(queue_items)
        .where(
            queue_items.c.pool == pool,
            queue_items.c.status == CLAIMED,
            queue_items.c.lease_until >= now,
        )
    ).scalar()
    return int(held or 0) < int(slots)


def renew(
    store: MetadataStore, worker_id: str, item_ids: Sequence[int], lease_seconds: float
) -> int:
    """Extend the leases this worker holds; returns how many it still holds."""
    if not item_ids:
        return 0
    with store.engine.begin() as conn:
        return int(
            conn.execute(
                queue_items.update()
                .where(
                    queue_items.c.id.in_(list(item_ids)),
                    queue_items.c.claimed_by == worker_id,
                    queue_items.c.status == CLAIMED,
                )
                .values(lease_until=time.time() + lease_seconds)
            ).rowcount
            or 0
        )


def complete(
    store: MetadataStore, item_id: int, worker_id: str, outcome: bytes | None = None
) -> bool:
    """Mark a claimed item done (with a step's outcome). False if the claim was lost."""
    with store.engine.begin() as conn:
        done = conn.execute(
            queue_items.update()
            .where(
                queue_items.c.id == item_id,
                queue_items.c.claimed_by == worker_id,
                queue_items.c.status == CLAIMED,
            )
            .values(status=DONE, outcome=outcome, done_at=time.time(), lease_until=None)
        ).rowcount
    return bool(done)


def release(
    store: MetadataStore, item_id: int, worker_id: str, *, not_before: float | None = None
) -> None:
    """Hand a claim back (worker stopping, run suspended): claimable again."""
    values: dict[str, Any] = {"status": QUEUED, "claimed_by": None, "lease_until": None}
    if not_before is not None:
        values["not_before"] = not_before
    with store.engine.begin() as conn:
        conn.execute(
            queue_items.update()
            .where(queue_items.c.id == item_id, queue_items.c.claimed_by == worker_id)
            .values(**values)
        )


def finished_outcomes(store: MetadataStore, keys: Sequence[str]) -> list[tuple[str, bytes]]:
    """Outcomes of the done step attempts among `keys` (their step_key), removed from
    the queue in the same transaction as they are read."""
    if not keys:
        return []
    with store.engine.begin() as conn:
        rows = conn.execute(
            sa.select(queue_items.c.id, queue_items.c.dedupe, queue_items.c.outcome).where(
                queue_items.c.dedupe.in_(list(keys)), queue_items.c.status == DONE
            )
        ).all()
        if rows:
            conn.execute(queue_items.delete().where(queue_items.c.id.in_([r[0] for r in rows])))
    return [(str(r[1]), bytes(r[2] or b"")) for r in rows]


def item_id_for(store: MetadataStore, dedupe: str) -> int | None:
    with store.engine.connect() as conn:
        found = conn.execute(
            sa.select(queue_items.c.id).where(queue_items.c.dedupe == dedupe)
        ).scalar()
    return int(found) if found is not None else None


def set_pool(store: MetadataStore, name: str, slots: int) -> None:
    if slots < 0:
        raise ConfigError(f"pool {name!r}: slots must be >= 0, got {slots}")
    with store.engine.begin() as conn:
        updated = conn.execute(pools.update().where(pools.c.name == name).values(slots=slots))
        if not updated.rowcount:
            conn.execute(pools.insert().values(name=name, slots=slots))


def list_pools(store: MetadataStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {r.name: r.slots for r in conn.execute(sa.select(pools))}


def check_pool(store: MetadataStore, name: str) -> None:
    known = list_pools(store)
    if name not in known:
        raise ConfigError(
            f"unknown pool {name!r}",
            hint=f"Create it with `keel pools set {name} SLOTS`"
            + (f"; existing pools: {', '.join(sorted(known))}" if known else ""),
        )


def live_workers(store: MetadataStore, stale_after: float = 30.0) -> list[Any]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(workers).where(
                    workers.c.status == "running",
                    workers.c.heartbeat_at >= time.time() - stale_after,
                )
            )
        )


def claim_run(
    store: MetadataStore, worker_id: str, run_id: str, *, lease_seconds: float
) -> Claim | None:
    """Claim one particular run's queue entry if it is claimable now."""
    now = time.time()
    with store.engine.begin() as conn:
        row = conn.execute(
            queue_items.update()
            .where(queue_items.c.dedupe == f"run:{run_id}", _due(now))
            .values(**_claimed_values(worker_id, now, lease_seconds))
            .returning(*_CLAIM_COLUMNS)
        ).first()
    return Claim(*row) if row is not None else None


def take_run(
    store: MetadataStore,
    run_id: str,
    owner: str,
    *,
    queue: str,
    priority: int,
    lease_seconds: float,
    evict: str | None = None,
) -> Claim | None:
    """Become the owner of a run that is about to be driven here (started, resumed):
    its entry is created if it has none, and claimed unless another owner holds a
    live lease on it. `evict` names an owner the caller knows is gone (its process
    died on this host, or the user forced it), whose claim is taken even before its
    lease runs out. One transaction, a compare-and-set on the claim: of several
    processes taking the same run at once, one gets it and the others None."""
    now = time.time()
    dedupe = f"run:{run_id}"
    row = _row(dedupe, "run", run_id, None, None, queue, priority, None, None, now)
    free = sa.or_(
        queue_items.c.status != CLAIMED,
        queue_items.c.lease_until < now,
        queue_items.c.claimed_by == owner,
    )
    if evict is not None:
        free = sa.or_(free, queue_items.c.claimed_by == evict)
    with store.engine.begin() as conn:
        _insert_ignore(store, conn, [row])
        got = conn.execute(
            queue_items.update()
            .where(queue_items.c.dedupe == dedupe, free)
            .values(**_claimed_values(owner, now, lease_seconds), not_before=now, done_at=None)
            .returning(*_CLAIM_COLUMNS)
        ).first()
    return Claim(*got) if got is not None else None


def claimed_entry(
    run_id: str, owner: str, *, queue: str, priority: int, lease_seconds: float
) -> dict[str, Any]:
    """The queue entry of a new run, claimed by its owner from the start: inserted in
    the run's own transaction (MetadataStore.insert_run), so no run is ever recorded
    without the lease that tells whether its owner lives."""
    now = time.time()
    row = _row(f"run:{run_id}", "run", run_id, None, None, queue, priority, None, None, now)
    row.update(status=CLAIMED, claimed_by=owner, lease_until=now + lease_seconds, claims=1)
    return row


def complete_if_ended(store: MetadataStore, item_id: int, owner: str) -> bool:
    """Mark an owner's run entry done if its run has ended (one statement: a run that
    parked re-armed its entry already, one that did not end keeps its claim)."""
    ended = sa.select(runs.c.id).where(
        runs.c.id == queue_items.c.run_id,
        runs.c.status.in_(("SUCCEEDED", "FAILED", "CANCELLED")),
    )
    with store.engine.begin() as conn:
        done = conn.execute(
            queue_items.update()
            .where(
                queue_items.c.id == item_id,
                queue_items.c.claimed_by == owner,
                queue_items.c.status == CLAIMED,
                ended.exists(),
            )
            .values(status=DONE, done_at=time.time(), lease_until=None)
        ).rowcount
    return bool(done)


@dataclass(frozen=True, slots=True)
class RunLease:
    """Who holds a run's entry, and until when (see run_lease)."""

    status: str
    owner: str | None
    lease_until: float | None

    def lost(self, now: float | None = None) -> bool:
        """Claimed by an owner that stopped renewing its lease."""
        moment = time.time() if now is None else now
        return self.status == CLAIMED and (self.lease_until or 0.0) < moment


def run_lease(store: MetadataStore, run_id: str) -> RunLease | None:
    """The state of a (root) run's queue entry, or None if it has none."""
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(
                queue_items.c.status, queue_items.c.claimed_by, queue_items.c.lease_until
            ).where(queue_items.c.dedupe == f"run:{run_id}")
        ).first()
    return RunLease(row[0], row[1], row[2]) if row is not None else None


@dataclass(frozen=True, slots=True)
class LostOwner:
    """A run whose owner stopped renewing its lease: who it was, and since when."""

    owner: str
    since: float  # when its lease ran out


def lost_owners(store: MetadataStore, run_ids: Sequence[str]) -> dict[str, LostOwner]:
    """Of the given unfinished (root) runs, those whose owner is lost, by run id."""
    if not run_ids:
        return {}
    now = time.time()
    out: dict[str, LostOwner] = {}
    ids = list(dict.fromkeys(run_ids))
    with store.engine.connect() as conn:
        for start in range(0, len(ids), 500):  # SQLite caps bound parameters
            rows = conn.execute(
                sa.select(
                    queue_items.c.run_id, queue_items.c.claimed_by, queue_items.c.lease_until
                ).where(
                    queue_items.c.dedupe.in_([f"run:{i}" for i in ids[start : start + 500]]),
                    queue_items.c.status == CLAIMED,
                    queue_items.c.lease_until < now,
                )
            )
            for run_id, owner, until in rows:
                out[run_id] = LostOwner(owner or "?", float(until))
    return out


def claim_lost_run(
    store: MetadataStore,
    taker: str,
    *,
    lease_seconds: float,
    queues: Sequence[str] | None = None,
) -> Claim | None:
    """Take over one unfinished run whose owner's lease ran out (of the given queues,
    or any), or None. The candidate is locked (PostgreSQL: SKIP LOCKED; SQLite: the
    write lock) and claimed by a compare-and-set on its expired lease, so of several
    servers and workers looking at once exactly one takes it."""
    now = time.time()
    unfinished = sa.select(runs.c.id).where(
        runs.c.id == queue_items.c.run_id, runs.c.status.in_(("RUNNING", "PENDING"))
    )
    stmt = (
        sa.select(queue_items.c.id)
        .where(
            queue_items.c.status == CLAIMED,
            queue_items.c.lease_until < now,
            queue_items.c.kind == "run",
            unfinished.exists(),
        )
        .order_by(queue_items.c.lease_until)
        .limit(1)
    )
    if queues is not None:
        stmt = stmt.where(queue_items.c.queue.in_(list(queues)))
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            stmt = stmt.with_for_update(of=queue_items, skip_locked=True)
        else:
            conn.exec_driver_sql("UPDATE keel_queue SET id = id WHERE 0")
        item_id = conn.execute(stmt).scalar()
        if item_id is None:
            return None
        got = conn.execute(
            queue_items.update()
            .where(
                queue_items.c.id == item_id,
                queue_items.c.status == CLAIMED,
                queue_items.c.lease_until < now,
            )
            .values(**_claimed_values(taker, now, lease_seconds))
            .returning(*_CLAIM_COLUMNS)
        ).first()
    return Claim(*got) if got is not None else None


class LeaseKeeper:
    """Renews a worker's leases in the background while it works on its claims."""

    def __init__(self, store: MetadataStore, worker_id: str, lease_seconds: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, item_id: int) -> None:
        with self._lock:
            self._ids.add(item_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="keel-leases", daemon=True)
                self._thread.start()

    def drop(self, item_id: int) -> None:
        with self._lock:
            self._ids.discard(item_id)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._ids)

    def _loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            ids = self.held()
            if not ids:
                continue
            try:
                renew(self.store, self.worker_id, ids, self.lease_seconds)
            except sa.exc.SQLAlchemyError:
                # The database blipped: try again at the next beat, well within the lease.
                continue

    def stop(self) -> None:
        self._stop.set()
