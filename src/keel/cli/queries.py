"""Read-only queries the CLI needs and `MetadataStore` does not offer (yet).

Each is one SQL statement, so listing runs or summarising a 100,000-step run does
not load every step row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from keel.store.metadata import MetadataStore
from keel.store.schema import attempts, runs, steps

# Above this many values an IN (...) list is dropped for a scan of the run (SQLite
# caps the number of bound parameters per statement).
_MAX_IN = 500


def step_counts(store: MetadataStore, run_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """For each run, how many of its steps are in each status."""
    out: dict[str, dict[str, int]] = {rid: {} for rid in run_ids}
    ids = list(out)
    for start in range(0, len(ids), _MAX_IN):
        stmt = (
            sa.select(steps.c.run_id, steps.c.status, sa.func.count())
            .where(steps.c.run_id.in_(ids[start : start + _MAX_IN]))
            .group_by(steps.c.run_id, steps.c.status)
        )
        with store.engine.connect() as conn:
            for run_id, status, count in conn.execute(stmt):
                out[run_id][status] = int(count)
    return out


def failed_steps(store: MetadataStore, run_id: str, limit: int = 5) -> list[Any]:
    """The first failed steps of a run, in step order."""
    stmt = (
        sa.select(steps)
        .where(steps.c.run_id == run_id, steps.c.status == "FAILED")
        .order_by(steps.c.seq)
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(stmt))


def result_info(store: MetadataStore, run_id: str) -> Any:
    """How a run's result is stored (type, inline or not), without reading the value."""
    stmt = sa.select(
        runs.c.result_serializer, runs.c.result_type, runs.c.result_ref, runs.c.executor
    ).where(runs.c.id == run_id)
    with store.engine.connect() as conn:
        return conn.execute(stmt).first()


def earlier_cached_steps(
    store: MetadataStore, task: str, before: float, *, exclude: tuple[str, int], limit: int = 200
) -> list[Any]:
    """The most recent steps of `task` with a cache key that started before `before`."""
    stmt = (
        sa.select(steps)
        .where(
            steps.c.task == task,
            steps.c.cache_info.is_not(None),
            steps.c.started_at < before,
            sa.not_(sa.and_(steps.c.run_id == exclude[0], steps.c.seq == exclude[1])),
        )
        .order_by(steps.c.started_at.desc())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(stmt))


def attempt_counts(store: MetadataStore, run_id: str, seqs: Sequence[int]) -> dict[int, int]:
    """How many attempts each of the given steps made (one query, however many steps)."""
    if not seqs:
        return {}
    stmt = sa.select(attempts.c.seq, sa.func.count()).where(attempts.c.run_id == run_id)
    if len(seqs) <= _MAX_IN:
        stmt = stmt.where(attempts.c.seq.in_(list(seqs)))
    wanted = set(seqs)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.group_by(attempts.c.seq))
        return {int(seq): int(n) for seq, n in rows if seq in wanted}
