"""`keel.Schedule`: when a workflow runs by itself, declared next to its code.

    @keel.workflow(schedule=keel.Schedule(cron="0 3 * * *", timezone="Europe/Paris"))
    def nightly(logical_date: datetime) -> None: ...

Declaring a schedule records nothing: `keel scheduler --load FILE`, `keel worker
--load FILE` and `keel schedules sync REF` register it in the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from keel.errors import ScheduleError

CATCHUP = ("none", "latest", "all")
OVERLAP = ("skip", "queue", "cancel_previous")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def check_name(name: str, what: str = "schedule") -> str:
    """Schedule and trigger names: letters, digits, _ - . (they also name pools)."""
    if not isinstance(name, str) or not name or len(name) > 90 or set(name) - _NAME_CHARS:
        raise ScheduleError(
            f"bad {what} name {name!r}",
            hint="Use letters, digits and _ - . (at most 90 characters)",
        )
    return name


def check_policies(catchup: str, overlap: str, max_active_runs: int | None) -> None:
    if catchup not in CATCHUP:
        raise ScheduleError(
            f"unknown catch-up policy {catchup!r}",
            hint="Use none (skip missed ticks), latest (run the most recent one) "
            "or all (run every missed tick)",
        )
    if overlap not in OVERLAP:
        raise ScheduleError(
            f"unknown overlap policy {overlap!r}",
            hint="Use skip, queue or cancel_previous",
        )
    if max_active_runs is not None and (
        isinstance(max_active_runs, bool) or not isinstance(max_active_runs, int)
        or max_active_runs < 1
    ):  # fmt: skip
        raise ScheduleError(f"max_active_runs must be a whole number >= 1, got {max_active_runs!r}")


@dataclass(frozen=True)
class Schedule:
    """A schedule: `cron` (five fields, read in `timezone`) or `every` ('15m', seconds,
    a timedelta); `params` for each run; what to do with ticks missed while no
    scheduler ran (`catchup`: none, latest, all) and with a tick that comes while
    runs of the schedule are still active (`overlap`: skip, queue, cancel_previous;
    `max_active_runs` caps them). `start`/`end` bound the ticks; `name` defaults to
    the workflow's name."""

    cron: str | None = None
    every: str | float | timedelta | None = None
    timezone: str = "UTC"
    params: Mapping[str, Any] = field(default_factory=dict)
    catchup: str = "latest"
    overlap: str = "queue"
    max_active_runs: int | None = None
    queue: str | None = None
    priority: int | None = None
    start: datetime | str | None = None
    end: datetime | str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        from keel.scheduler.cadence import Cadence  # croniter loads only for schedules

        Cadence.parse(cron=self.cron, every=self.every, timezone=self.timezone)
        check_policies(self.catchup, self.overlap, self.max_active_runs)
        if self.name is not None:
            check_name(self.name)
        if not isinstance(self.params, Mapping):
            raise ScheduleError(f"a schedule's params must be a mapping, got {self.params!r}")


def declare(
    workflow: str,
    schedule: str | Schedule | None,
    *,
    params: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    catchup: str | None = None,
    overlap: str | None = None,
    max_active_runs: int | None = None,
) -> Schedule:
    """The schedule of `@keel.workflow(schedule=..., params=..., ...)`."""
    extras: dict[str, Any] = {
        "params": params,
        "timezone": timezone,
        "catchup": catchup,
        "overlap": overlap,
        "max_active_runs": max_active_runs,
    }
    given = {k: v for k, v in extras.items() if v is not None}
    where = f"workflow {workflow}"
    if schedule is None:
        raise ScheduleError(
            f"{where}: {', '.join(given)} given without a schedule",
            hint="Add schedule='0 3 * * *' (or schedule=keel.Schedule(...))",
        )
    if isinstance(schedule, Schedule):
        if given:
            raise ScheduleError(
                f"{where}: give {', '.join(given)} inside keel.Schedule(...), not beside it"
            )
        return schedule
    if not isinstance(schedule, str):
        raise ScheduleError(
            f"{where}: schedule must be a cron expression or a keel.Schedule, got {schedule!r}"
        )
    try:
        return Schedule(cron=schedule, **given)
    except ScheduleError as exc:
        raise ScheduleError(f"{where}: {exc.message}", hint=exc.hint) from None
