"""Schedules: their definitions in the store, and the scheduler's step that starts the
runs of due ticks.

    keel.schedules.add("nightly", train, cron="0 3 * * *", timezone="Europe/Paris")
    keel.schedules.pause("nightly")

Each tick's run is queued for workers (PENDING, on the schedule's queue) with the
schedule's name and the tick's logical date on its row, and the logical date as
its `logical_date` parameter when the workflow declares one (an ISO 8601 string in
the schedule's time zone: type it `datetime` to get an aware datetime, or `str`).

Exactly one run per tick: the tick's row in keel_ticks (primary key: schedule and
logical date), the run and its queue entry are written in one transaction, which
starts by locking the schedule's row, so concurrent schedulers take turns and a
crash leaves either all of it or none of it.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from keel.errors import ParameterError, ScheduleError
from keel.scheduler.cadence import Cadence, parse_instant
from keel.scheduler.launch import (
    ACTIVE,
    LOGICAL_DATE,
    Launch,
    cancel_claimed,
    cancel_queued,
    claim_ticks,
    ensure_pool,
    insert_runs,
    lock_row,
    prepare,
    takes_logical_date,
)
from keel.sdk.definitions import Workflow, check_queue_name, registered_workflows
from keel.sdk.schedule import Schedule, check_name, check_policies
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import runs, ticks
from keel.store.schema import schedules as schedule_rows

log = logging.getLogger("keel.scheduler")

# A tick seen more than this late counts as missed (catch-up `none` skips it).
ON_TIME_GRACE = 60.0
# At most this many ticks start per schedule in one pass (catch-up `all` after a long
# outage continues on the next passes).
MAX_TICKS_PER_PASS = 1000


@dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as stored."""

    name: str
    workflow: str
    entrypoint: str | None
    cadence: Cadence
    params: dict[str, Any]
    catchup: str
    overlap: str
    max_active_runs: int | None
    queue: str
    priority: int
    paused: bool
    start_at: float
    end_at: float | None
    next_tick: float | None
    created_at: float
    updated_at: float

    @property
    def status(self) -> str:
        if self.paused:
            return "paused"
        return "ended" if self.next_tick is None else "active"

    @property
    def next_run(self) -> datetime | None:
        """The next tick, in the schedule's time zone (None once it has ended)."""
        if self.next_tick is None:
            return None
        return datetime.fromtimestamp(self.next_tick, self.cadence.tz)


@dataclass
class TickOutcome:
    """What one pass did for one schedule."""

    schedule: str
    started: list[str] = field(default_factory=list)  # run ids
    skipped: list[float] = field(default_factory=list)  # ticks skipped by overlap=skip
    missed: int = 0  # ticks left out by the catch-up policy
    cancelled: list[str] = field(default_factory=list)  # runs stopped by cancel_previous


def pool_name(schedule: str) -> str:
    """The pool capping a schedule's queued runs (overlap=queue with max_active_runs)."""
    return f"schedule-{schedule}"


def _info(row: Any) -> ScheduleInfo:
    return ScheduleInfo(
        name=row.name,
        workflow=row.workflow,
        entrypoint=row.entrypoint,
        cadence=Cadence(
            cron=row.cron,
            every=int(row.interval_seconds) if row.interval_seconds else None,
            timezone=row.timezone,
        ),
        params=json.loads(row.params or "{}"),
        catchup=row.catchup,
        overlap=row.overlap,
        max_active_runs=row.max_active_runs,
        queue=row.queue,
        priority=row.priority,
        paused=bool(row.paused),
        start_at=row.start_at,
        end_at=row.end_at,
        next_tick=row.next_tick,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def resolve_workflow(workflow: Workflow[Any, Any] | str) -> Workflow[Any, Any]:
    """A workflow object, or one loaded from a `file.py:name` / `module:name` reference."""
    if isinstance(workflow, Workflow):
        return workflow
    if isinstance(workflow, str):
        from keel.sdk.loader import load_workflow

        return load_workflow(workflow)
    raise ScheduleError(f"{workflow!r} is not a workflow or a workflow reference")


def check_params(
    wf: Workflow[Any, Any], params: Mapping[str, Any] | None, cadence: Cadence
) -> dict[str, Any]:
    """The parameters a schedule gives every run, checked against the workflow with a
    sample logical date; returned as given (JSON data)."""
    given = dict(params or {})
    if LOGICAL_DATE in given:
        raise ParameterError(
            f"{LOGICAL_DATE!r} is set by the schedule for each run",
            hint="Leave it out of the schedule's params",
        )
    sample = dict(given)
    if takes_logical_date(wf):
        sample[LOGICAL_DATE] = cadence.local_iso(time.time())
    wf.validate(sample)
    # Stored with the schedule as JSON data.
    return json.loads(wf.validator.to_json(given))  # type: ignore[no-any-return]


def tick_params(
    wf: Workflow[Any, Any], static: Mapping[str, Any], cadence: Cadence, at: float
) -> dict[str, Any]:
    """A tick's run parameters: the schedule's, plus its logical date if declared."""
    given = dict(static)
    if takes_logical_date(wf):
        given[LOGICAL_DATE] = cadence.local_iso(at)
    return wf.validate(given)


# -- definitions -----------------------------------------------------------------------
def add(
    name: str,
    workflow: Workflow[Any, Any] | str,
    *,
    cron: str | None = None,
    every: str | float | timedelta | None = None,
    timezone: str = "UTC",
    params: Mapping[str, Any] | None = None,
    catchup: str = "latest",
    overlap: str = "queue",
    max_active_runs: int | None = None,
    queue: str | None = None,
    priority: int | None = None,
    start: datetime | str | float | None = None,
    end: datetime | str | float | None = None,
    replace: bool = False,
    store: MetadataStore | None = None,
) -> ScheduleInfo:
    """Create (or with `replace`, redefine) the schedule `name` of `workflow`.

    Ticks from `start` (default: now) to `end` (default: forever). With a `start` in
    the past, the ticks since then are missed ones: `catchup` decides.
    """
    check_name(name)
    wf = resolve_workflow(workflow)
    cadence = Cadence.parse(cron=cron, every=every, timezone=timezone)
    check_policies(catchup, overlap, max_active_runs)
    queue_name = check_queue_name(queue, f"schedule {name}") or wf.queue
    static = check_params(wf, params, cadence)
    now = time.time()
    start_at = parse_instant(start, cadence.tz, "start") if start is not None else now
    end_at = parse_instant(end, cadence.tz, "end", end=True) if end is not None else None
    if end_at is not None and end_at < start_at:
        raise ScheduleError(
            f"schedule {name}: end ({cadence.local_iso(end_at)}) is before its start "
            f"({cadence.local_iso(start_at)})",
            hint="Give an end after the start",
        )
    values: dict[str, Any] = {
        "workflow": wf.name,
        "entrypoint": wf.entrypoint,
        "cron": cadence.cron,
        "interval_seconds": cadence.every,
        "timezone": cadence.timezone,
        "params": json.dumps(static, sort_keys=True),
        "catchup": catchup,
        "overlap": overlap,
        "max_active_runs": max_active_runs,
        "queue": queue_name,
        "priority": wf.priority if priority is None else int(priority),
        "start_at": start_at,
        "end_at": end_at,
        "updated_at": now,
    }
    first = _first_tick(cadence, start_at, end_at)
    store = store or open_store()
    with store.engine.begin() as conn:
        lock_row(conn, schedule_rows, name, "next_tick")
        if overlap == "queue" and max_active_runs is not None:
            ensure_pool(conn, pool_name(name), max_active_runs)
        old = conn.execute(sa.select(schedule_rows).where(schedule_rows.c.name == name)).first()
        if old is None:
            conn.execute(
                schedule_rows.insert().values(
                    name=name, paused=False, next_tick=first, created_at=now, **values
                )
            )
        elif not replace:
            raise ScheduleError(
                f"schedule {name!r} exists already ({_info(old).cadence.describe()} "
                f"of {old.workflow})",
                hint="Pick another name, remove it first (keel schedules rm), or replace it",
            )
        else:
            same_ticks = (old.cron, old.interval_seconds, old.timezone, old.start_at) == (
                cadence.cron,
                cadence.every,
                cadence.timezone,
                old.start_at if start is None else start_at,
            )
            if same_ticks:
                # Redefined with the same ticks: carry on from where it was.
                values["start_at"] = old.start_at
                next_tick = old.next_tick
                if end_at is not None and next_tick is not None and next_tick > end_at:
                    next_tick = None
                elif next_tick is None and old.end_at is not None and end_at != old.end_at:
                    next_tick = _first_tick(cadence, max(now, old.end_at), end_at)
            else:
                next_tick = first
            conn.execute(
                schedule_rows.update()
                .where(schedule_rows.c.name == name)
                .values(next_tick=next_tick, **values)
            )
    return get(name, store=store)


def _first_tick(cadence: Cadence, start_at: float, end_at: float | None) -> float | None:
    first = cadence.first_at_or_after(start_at)
    return None if end_at is not None and first > end_at else first


def get(name: str, *, store: MetadataStore | None = None) -> ScheduleInfo:
    store = store or open_store()
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(schedule_rows).where(schedule_rows.c.name == name)).first()
    if row is None:
        raise unknown(store, name)
    return _info(row)


def unknown(store: MetadataStore, name: str) -> ScheduleError:
    with store.engine.connect() as conn:
        names = list(conn.execute(sa.select(schedule_rows.c.name)).scalars())
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        hint = f"Did you mean {', '.join(close)}?"
    elif names:
        hint = "See `keel schedules ls`"
    else:
        hint = "There are no schedules yet: create one with `keel schedules add`"
    return ScheduleError(f"no schedule named {name!r}", hint=hint)


def ls(*, store: MetadataStore | None = None) -> list[ScheduleInfo]:
    """Every schedule, by name."""
    store = store or open_store()
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(schedule_rows).order_by(schedule_rows.c.name)).all()
    return [_info(r) for r in rows]


def pause(name: str, *, store: MetadataStore | None = None) -> ScheduleInfo:
    """Stop starting runs. Ticks that pass while paused count as missed on resume."""
    return _set_paused(name, True, store)


def resume(name: str, *, store: MetadataStore | None = None) -> ScheduleInfo:
    """Start runs again; the catch-up policy decides about the ticks missed meanwhile."""
    return _set_paused(name, False, store)


def _set_paused(name: str, paused: bool, store: MetadataStore | None) -> ScheduleInfo:
    store = store or open_store()
    with store.engine.begin() as conn:
        done = conn.execute(
            schedule_rows.update()
            .where(schedule_rows.c.name == name)
            .values(paused=paused, updated_at=time.time())
        ).rowcount
    if not done:
        raise unknown(store, name)
    return get(name, store=store)


def remove(name: str, *, store: MetadataStore | None = None) -> None:
    """Delete the schedule. Its runs stay, and so do its recorded ticks: a schedule
    created again under this name never starts a second run for one of them."""
    store = store or open_store()
    with store.engine.begin() as conn:
        done = conn.execute(schedule_rows.delete().where(schedule_rows.c.name == name)).rowcount
    if not done:
        raise unknown(store, name)


def declared() -> dict[str, tuple[Workflow[Any, Any], Schedule]]:
    """Schedules declared with `@keel.workflow(schedule=...)` in the code loaded here."""
    found: dict[str, tuple[Workflow[Any, Any], Schedule]] = {}
    for wf in registered_workflows().values():
        spec = getattr(wf, "schedule", None)
        if isinstance(spec, Schedule):
            found[spec.name or wf.name] = (wf, spec)
    return found


def sync(
    target: Workflow[Any, Any] | str | None = None, *, store: MetadataStore | None = None
) -> list[ScheduleInfo]:
    """Register (or update) the schedules declared in code: those of `target` (a
    workflow, `file.py:name`, `module:name`, a `file.py` or a module), or of every
    workflow loaded in this process."""
    if isinstance(target, str):
        _load_code(target)
    wanted = declared()
    if isinstance(target, Workflow):
        wanted = {k: v for k, v in wanted.items() if v[0] is target}
    elif isinstance(target, str) and ":" in target:
        wf = resolve_workflow(target)
        wanted = {k: v for k, v in wanted.items() if v[0] is wf}
    out = []
    for name, (wf, spec) in sorted(wanted.items()):
        out.append(
            add(
                name,
                wf,
                cron=spec.cron,
                every=spec.every,
                timezone=spec.timezone,
                params=spec.params,
                catchup=spec.catchup,
                overlap=spec.overlap,
                max_active_runs=spec.max_active_runs,
                queue=spec.queue,
                priority=spec.priority,
                start=spec.start,
                end=spec.end,
                replace=True,
                store=store,
            )
        )
    return out


def _load_code(ref: str) -> None:
    import importlib
    from pathlib import Path

    from keel.sdk.loader import module_from_file

    if ":" in ref:
        resolve_workflow(ref)
    elif ref.endswith(".py") or "/" in ref:
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ScheduleError(f"no such file: {ref}", hint="Check the path")
        module_from_file(path)
    else:
        try:
            importlib.import_module(ref)
        except ModuleNotFoundError as exc:
            raise ScheduleError(f"cannot import module {ref!r}: {exc}") from None


# -- the scheduler's step ----------------------------------------------------------------
def due(store: MetadataStore, now: float) -> list[str]:
    """Names of the schedules with a tick at or before `now`."""
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(schedule_rows.c.name)
                .where(
                    schedule_rows.c.paused.is_(False),
                    schedule_rows.c.next_tick.is_not(None),
                    schedule_rows.c.next_tick <= now,
                )
                .order_by(schedule_rows.c.next_tick)
            ).scalars()
        )


def _plan(info: ScheduleInfo, now: float) -> tuple[list[float], int, float | None]:
    """The ticks to start now, how many missed ones are left out, the next tick."""
    cadence, first = info.cadence, info.next_tick
    assert first is not None
    until = now if info.end_at is None else min(now, info.end_at)
    if first > until:
        return [], 0, first if info.end_at is None or first <= info.end_at else None
    if info.catchup == "all":
        fire = cadence.between(first, until, limit=MAX_TICKS_PER_PASS)
        following = cadence.next_after(fire[-1]) if fire else cadence.next_after(until)
        missed = 0
    else:
        last = max(cadence.last_at_or_before(until), first)
        on_time = now - last <= ON_TIME_GRACE
        fire = [last] if info.catchup == "latest" or on_time else []
        missed = _count(cadence, first, last) - len(fire)
        following = cadence.next_after(last)
    if info.end_at is not None and following > info.end_at:
        return fire, missed, None
    return fire, missed, following


def _count(cadence: Cadence, start: float, end: float) -> int:
    if cadence.every is not None:
        return int((end - start) // cadence.every) + 1
    return len(cadence.between(start, end, limit=100_000))


def run_due(
    store: MetadataStore,
    name: str,
    now: float,
    load: Callable[[str, str | None], Workflow[Any, Any]],
) -> TickOutcome:
    """Start the due ticks of schedule `name` as of `now` (one transaction)."""
    outcome = TickOutcome(name)
    with store.engine.connect() as conn:
        pre = conn.execute(sa.select(schedule_rows).where(schedule_rows.c.name == name)).first()
    if pre is None or pre.paused or pre.next_tick is None or pre.next_tick > now:
        return outcome
    wf = load(pre.workflow, pre.entrypoint)  # user code: loaded before taking any lock
    prepare(store, wf)
    stop_later: list[str] = []
    with store.engine.begin() as conn:
        if not lock_row(conn, schedule_rows, name, "next_tick"):
            return outcome
        row = conn.execute(sa.select(schedule_rows).where(schedule_rows.c.name == name)).first()
        if row is None or row.paused or row.next_tick is None or row.next_tick > now:
            return outcome  # another scheduler did it while we waited for the lock
        info = _info(row)
        fire, outcome.missed, following = _plan(info, now)
        for at in fire:
            _start_tick(conn, store, info, wf, at, outcome, stop_later)
        conn.execute(
            schedule_rows.update().where(schedule_rows.c.name == name).values(next_tick=following)
        )
    for run_id in stop_later:  # runs a worker holds: asked to stop once the tick is in
        cancel_claimed(store, run_id)
    return outcome


def _start_tick(
    conn: sa.Connection,
    store: MetadataStore,
    info: ScheduleInfo,
    wf: Workflow[Any, Any],
    at: float,
    outcome: TickOutcome,
    stop_later: list[str],
) -> None:
    limit = info.max_active_runs or (None if info.overlap == "queue" else 1)
    if info.overlap != "queue" and limit is not None:
        active = _active_runs(conn, info.name)
        if len(active) >= limit:
            if info.overlap == "skip":
                if claim_ticks(conn, store, info.name, [(at, None)]):
                    outcome.skipped.append(at)
                return
            reason = (
                f"cancelled by schedule {info.name}: the tick of "
                f"{info.cadence.local_iso(at)} replaced it (overlap=cancel_previous)"
            )
            for run_id in active[: len(active) - limit + 1]:
                if not cancel_queued(conn, run_id, reason):
                    stop_later.append(run_id)
                outcome.cancelled.append(run_id)
    launch = Launch(
        workflow=wf,
        params=tick_params(wf, info.params, info.cadence, at),
        queue=info.queue,
        priority=info.priority,
        pool=None,
        schedule=info.name,
        logical_date=at,
        tags={"keel.schedule": info.name, "keel.logical_date": info.cadence.local_iso(at)},
    )
    if info.overlap == "queue" and limit is not None:
        # The pool holds extra ticks' runs queued until a slot frees up.
        launch.pool = pool_name(info.name)
        ensure_pool(conn, launch.pool, limit)
    if claim_ticks(conn, store, info.name, [(at, launch.run_id)]):
        insert_runs(conn, store, [launch])
        outcome.started.append(launch.run_id)


def _active_runs(conn: sa.Connection, schedule: str) -> list[str]:
    """The schedule's runs still pending or running, oldest first (backfill runs, which
    carry a trigger name, are not the schedule's own)."""
    rows = list(
        conn.execute(
            sa.select(runs.c.id, runs.c.cancel_requested)
            .where(
                runs.c.schedule == schedule,
                runs.c.status.in_(ACTIVE),
                runs.c.trigger_name.is_(None),
            )
            .order_by(runs.c.created_at, runs.c.id)
        )
    )
    # A run already asked to stop no longer counts against the limit.
    return [r.id for r in rows if not r.cancel_requested]


def tick_history(
    name: str, *, limit: int = 20, store: MetadataStore | None = None
) -> list[tuple[float, str | None]]:
    """The schedule's latest recorded ticks: (logical date, run id or None if skipped)."""
    store = store or open_store()
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ticks.c.logical_date, ticks.c.run_id)
            .where(ticks.c.schedule == name)
            .order_by(ticks.c.logical_date.desc())
            .limit(limit)
        ).all()
    return [(float(r[0]), r[1]) for r in rows]


# `keel.schedules.add(...)`, `keel.schedules.pause(...)`: this module is the namespace.
schedules = sys.modules[__name__]
