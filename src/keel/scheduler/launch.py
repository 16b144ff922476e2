"""Queued runs started by schedules, backfills and triggers.

A run and its queue entry are written on the caller's connection, so they commit
in the same transaction as what caused them (a schedule tick, a trigger event):
a crash in between cannot lose the cause or start its run twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from keel.engine.execute import new_run_row
from keel.ids import new_run_id
from keel.sdk.definitions import Workflow
from keel.status import RunStatus
from keel.store.metadata import MetadataStore
from keel.store.schema import params as params_table
from keel.store.schema import pools, queue_items, runs, ticks
from keel.store.schema import tags as tags_table
from keel.store.tracking import MAX_PARAM_LENGTH, experiment_id

# The parameter through which a run learns the logical date of its tick.
LOGICAL_DATE = "logical_date"
ACTIVE = (str(RunStatus.PENDING), str(RunStatus.RUNNING))


@dataclass
class Launch:
    """One run to queue: the workflow, its validated parameters, where it waits, and
    what started it."""

    workflow: Workflow[Any, Any]
    params: dict[str, Any]
    queue: str
    priority: int
    pool: str | None = None
    schedule: str | None = None
    logical_date: float | None = None
    trigger_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)


def takes_logical_date(workflow: Workflow[Any, Any]) -> bool:
    return LOGICAL_DATE in workflow.validator.params


def prepare(store: MetadataStore, workflow: Workflow[Any, Any]) -> None:
    """Create the workflow's experiment now, outside the caller's transaction (on
    SQLite a second connection writing inside it would wait for itself)."""
    experiment_id(store, workflow.experiment or workflow.name)


def _param_text(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def insert_runs(conn: sa.Connection, store: MetadataStore, launches: Sequence[Launch]) -> None:
    """Insert queued (PENDING) runs, their tracked params and tags, and their queue
    entries, on `conn`. Call `prepare` for each workflow first."""
    if not launches:
        return
    now = time.time()
    run_rows, param_rows, tag_rows, queue_rows = [], [], [], []
    for item in launches:
        wf = item.workflow
        row = new_run_row(
            store, item.run_id, wf, wf.validator.to_json(item.params), executor=wf.executor
        )
        # Nobody owns a queued run yet: the worker that claims it records itself.
        row.update(
            status=str(RunStatus.PENDING),
            started_at=None,
            host=None,
            pid=None,
            queue=item.queue,
            priority=item.priority,
            schedule=item.schedule,
            logical_date=item.logical_date,
            trigger_name=item.trigger_name,
        )
        run_rows.append(row)
        for key, value in item.params.items():
            param_rows.append(
                {"run_id": item.run_id, "seq": -1, "key": key, "value": _param_text(value)}
            )
        all_tags = {**json.loads(row["tags"] or "{}"), **item.tags}
        for key, value in all_tags.items():
            tag_rows.append({"run_id": item.run_id, "seq": -1, "key": key, "value": str(value)})
        queue_rows.append(
            {
                "dedupe": f"run:{item.run_id}",
                "kind": "run",
                "run_id": item.run_id,
                "seq": None,
                "attempt": None,
                "queue": item.queue,
                "priority": item.priority,
                "pool": item.pool,
                "not_before": now,
                "status": "queued",
                "claims": 0,
                "payload": None,
                "created_at": now,
            }
        )
    conn.execute(runs.insert(), run_rows)
    if param_rows:
        conn.execute(params_table.insert(), param_rows)
    if tag_rows:
        conn.execute(tags_table.insert(), tag_rows)
    conn.execute(queue_items.insert(), queue_rows)


def _insert_ignore(store: MetadataStore) -> Any:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert


def claim_ticks(
    conn: sa.Connection,
    store: MetadataStore,
    key: str,
    wanted: Iterable[tuple[float, str | None]],
    chunk: int = 500,
) -> set[float]:
    """Record ticks (logical date, run id or None for a skipped tick) of the schedule
    key `key`; returns the logical dates recorded now. A tick someone recorded
    before (another scheduler, a backfill) is left alone: the primary key is what
    guarantees one run per tick."""
    now = time.time()
    rows = [
        {"schedule": key, "logical_date": at, "run_id": run_id, "created_at": now}
        for at, run_id in wanted
    ]
    insert = _insert_ignore(store)
    claimed: set[float] = set()
    for i in range(0, len(rows), chunk):
        stmt = (
            insert(ticks)
            .values(rows[i : i + chunk])
            .on_conflict_do_nothing()
            .returning(ticks.c.logical_date)
        )
        claimed.update(float(r[0]) for r in conn.execute(stmt))
    return claimed


def lock_row(conn: sa.Connection, table: sa.Table, key: str, touch: str) -> bool:
    """Take the lock of the row named `key` for the rest of the transaction (on SQLite:
    the database's write lock) by a no-op update of its column `touch`, so that
    concurrent schedulers work on it one at a time. False if there is no such row."""
    column = table.c[touch]
    done = conn.execute(table.update().where(table.c.name == key).values({touch: column}))
    return bool(done.rowcount)


def ensure_pool(conn: sa.Connection, name: str, slots: int) -> None:
    """Create or resize a pool on `conn` (in the transaction that queues its items, so
    no pool pruning can come in between)."""
    done = conn.execute(pools.update().where(pools.c.name == name).values(slots=slots))
    if not done.rowcount:
        conn.execute(pools.insert().values(name=name, slots=slots))


def cancel_queued(conn: sa.Connection, run_id: str, reason: str) -> bool:
    """Cancel a run that waits in the queue unclaimed, on `conn`; False if a worker
    holds it (then it must be asked to stop, after this transaction)."""
    now = time.time()
    taken = conn.execute(
        queue_items.update()
        .where(queue_items.c.dedupe == f"run:{run_id}", queue_items.c.status == "queued")
        .values(status="done", done_at=now, lease_until=None)
    ).rowcount
    if not taken:
        return False
    conn.execute(
        runs.update()
        .where(runs.c.id == run_id, runs.c.status.in_(ACTIVE))
        .values(
            status=str(RunStatus.CANCELLED),
            ended_at=now,
            cancel_requested=True,
            error_type="Cancelled",
            error_message=reason,
        )
    )
    return True


def cancel_claimed(store: MetadataStore, run_id: str) -> None:
    """Ask a run a worker holds to stop (the engine's cancel). If the engine recorded
    it as cancelled outright (its owner is gone), retire its queue entry too, so no
    worker picks a cancelled run up again when the dead owner's lease runs out."""
    from keel.engine.api import cancel

    if cancel(run_id, store=store) == RunStatus.CANCELLED:
        with store.engine.begin() as conn:
            conn.execute(
                queue_items.update()
                .where(
                    queue_items.c.dedupe == f"run:{run_id}",
                    sa.or_(
                        queue_items.c.status == "queued",
                        queue_items.c.lease_until < time.time(),
                    ),
                )
                .values(status="done", done_at=time.time(), lease_until=None)
            )
