"""Backfills: one queued run per interval of a past (or future) range, created at once.

    keel.backfill(train, "2024-01-01", "2024-03-31", cron="0 3 * * *", max_active_runs=2)
    keel.backfill("nightly", "2024-01-01", "2024-03-31")   # a schedule's cadence and params

A backfill does not starve the live schedules: its runs have a lower priority than
the schedules' (claims take the highest priority first), and a pool of its own
(`backfill-<id>`, `max_active_runs` slots) caps how many run at once, so a worker
always has room for a fresh scheduled run as long as the cap is below the workers'
total concurrency.

Its ticks go into keel_ticks under the schedule's name (the schedule given, or the
one schedule of the workflow with the same cadence), so a backfill and the live
schedule, or two overlapping backfills, never start two runs for one logical date.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.errors import ScheduleError
from keel.scheduler import schedules
from keel.scheduler.cadence import Cadence, parse_instant
from keel.scheduler.launch import (
    Launch,
    claim_ticks,
    ensure_pool,
    insert_runs,
    lock_row,
    prepare,
)
from keel.sdk.definitions import Workflow
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import pools, queue_items
from keel.store.schema import schedules as schedule_rows

# How far below its schedule's (or workflow's) priority a backfill's runs queue.
PRIORITY_DROP = 10
DEFAULT_MAX_ACTIVE_RUNS = 2
MAX_INTERVALS = 100_000
POOL_PREFIX = "backfill-"


@dataclass(frozen=True)
class Backfill:
    """What a backfill queued."""

    id: str
    workflow: str
    schedule: str  # the key its ticks are recorded under
    run_ids: list[str]
    already_done: int  # intervals that had a run already (from the schedule or a backfill)
    pool: str
    max_active_runs: int
    priority: int
    first: datetime | None
    last: datetime | None

    @property
    def runs(self) -> int:
        return len(self.run_ids)


def backfill(
    workflow: Workflow[Any, Any] | str | None,
    start: datetime | str | float,
    end: datetime | str | float,
    *,
    cron: str | None = None,
    every: str | float | timedelta | None = None,
    timezone: str | None = None,
    params: Mapping[str, Any] | None = None,
    max_active_runs: int = DEFAULT_MAX_ACTIVE_RUNS,
    schedule: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    store: MetadataStore | None = None,
) -> Backfill:
    """Queue one run per tick t with start <= t <= end, each with its logical date.

    `workflow` is a workflow, a `file.py:name` / `module:name` reference, or the name
    of a schedule (whose cadence, time zone, params and queue are used; `params`
    adds to or overrides its params). Otherwise give `cron` (with `timezone`) or
    `every`. At most `max_active_runs` of the backfill's runs execute at once.
    """
    store = store or open_store()
    if isinstance(workflow, str) and ":" not in workflow and schedule is None:
        schedule, workflow = workflow, None
    if not isinstance(max_active_runs, int) or max_active_runs < 1:
        raise ScheduleError(f"max_active_runs must be >= 1, got {max_active_runs!r}")
    if schedule is not None:
        info = schedules.get(schedule, store=store)
        if cron is not None or every is not None or timezone is not None:
            raise ScheduleError(
                f"a backfill of schedule {schedule} uses its cadence ({info.cadence.describe()})",
                hint="Leave out cron, every and timezone, or backfill the workflow instead",
            )
        from keel.engine.api import locate_workflow

        wf = locate_workflow(info.workflow, info.entrypoint)
        if workflow is not None and schedules.resolve_workflow(workflow).name != wf.name:
            raise ScheduleError(f"schedule {schedule} runs workflow {wf.name}, not {workflow}")
        cadence, key = info.cadence, info.name
        static = {**info.params, **(params or {})}
        queue_name, base_priority, real_schedule = info.queue, info.priority, True
    else:
        if workflow is None:
            raise ScheduleError("a backfill needs a workflow or a schedule name")
        wf = schedules.resolve_workflow(workflow)
        cadence = Cadence.parse(cron=cron, every=every, timezone=timezone or "UTC")
        key, real_schedule = _ticks_key(store, wf, cadence)
        static = dict(params or {})
        queue_name, base_priority = wf.queue, wf.priority
    static = schedules.check_params(wf, static, cadence)
    lo = parse_instant(start, cadence.tz, "start")
    hi = parse_instant(end, cadence.tz, "end", end=True)
    if hi < lo:
        raise ScheduleError(
            f"the backfill's end ({cadence.local_iso(hi)}) is before its start "
            f"({cadence.local_iso(lo)})",
            hint="Give --start before --end",
        )
    at = cadence.between(lo, hi, limit=MAX_INTERVALS + 1)
    if not at:
        raise ScheduleError(
            f"{cadence.describe()} has no tick between {cadence.local_iso(lo)} and "
            f"{cadence.local_iso(hi)}",
            hint="Widen the range (start and end are both included)",
        )
    if len(at) > MAX_INTERVALS:
        raise ScheduleError(
            f"the backfill would start more than {MAX_INTERVALS:,} runs",
            hint="Narrow the range, or run it as several backfills",
        )
    prio = base_priority - PRIORITY_DROP if priority is None else int(priority)
    ident = secrets.token_hex(4)
    pool = POOL_PREFIX + ident
    launches = {
        t: Launch(
            workflow=wf,
            params=schedules.tick_params(wf, static, cadence, t),
            queue=queue or queue_name,
            priority=prio,
            pool=pool,
            schedule=key if real_schedule else None,
            logical_date=t,
            trigger_name=pool,
            tags={"keel.backfill": ident, "keel.logical_date": cadence.local_iso(t)},
        )
        for t in at
    }
    prepare(store, wf)
    with store.engine.begin() as conn:
        if real_schedule:
            lock_row(conn, schedule_rows, key, "next_tick")  # take turns with its scheduler
        ensure_pool(conn, pool, max_active_runs)
        claimed = claim_ticks(conn, store, key, [(t, run.run_id) for t, run in launches.items()])
        todo = [launches[t] for t in at if t in claimed]
        insert_runs(conn, store, todo)

    def local(t: float) -> datetime:
        return datetime.fromtimestamp(t, cadence.tz)

    return Backfill(
        id=ident,
        workflow=wf.name,
        schedule=key,
        run_ids=[run.run_id for run in todo],
        already_done=len(at) - len(todo),
        pool=pool,
        max_active_runs=max_active_runs,
        priority=prio,
        first=local(at[0]),
        last=local(at[-1]),
    )


def _ticks_key(store: MetadataStore, wf: Workflow[Any, Any], cadence: Cadence) -> tuple[str, bool]:
    """The schedule of `wf` with this cadence (its ticks are the backfill's), else a
    key of the workflow and cadence (so repeated backfills do not overlap either)."""
    same = [
        s.name for s in schedules.ls(store=store) if s.workflow == wf.name and s.cadence == cadence
    ]
    if len(same) > 1:
        raise ScheduleError(
            f"workflow {wf.name} has several schedules with {cadence.describe()}: "
            f"{', '.join(same)}",
            hint="Name the one to backfill: keel backfill SCHEDULE --start ... --end ...",
        )
    if same:
        return same[0], True
    what = cadence.cron if cadence.cron is not None else f"every {cadence.every}s"
    return f"backfill:{wf.name}:{what}:{cadence.timezone}"[:200], False


def prune_pools(store: MetadataStore) -> int:
    """Drop the pools of backfills none of whose runs wait or run any more."""
    busy = (
        sa.select(queue_items.c.id)
        .where(queue_items.c.pool == pools.c.name, queue_items.c.status != "done")
        .exists()
    )
    with store.engine.begin() as conn:
        done = conn.execute(
            pools.delete().where(pools.c.name.startswith(POOL_PREFIX), ~busy)
        ).rowcount
    return int(done or 0)
