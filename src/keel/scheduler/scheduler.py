"""The scheduler: one `tick()` is one pass over due schedules, triggers and sensors.

`keel scheduler` runs it alone, in a loop; `keel worker` runs a pass on every turn
of its loop (service.py) unless started with --no-scheduler. Any number of them may
run at once against one store: every start happens in a transaction that locks
the schedule's or trigger's row and records its cause under a unique key.

The clock is injectable (`now`), so tests move time instead of sleeping.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from keel.errors import KeelError
from keel.scheduler import backfill, schedules, sensors, triggers
from keel.sdk.definitions import Workflow
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import schedules as schedule_rows

log = logging.getLogger("keel.scheduler")

Clock = Callable[[], "datetime | float"]
# After an error (unloadable code, bad parameters), leave the schedule or trigger
# alone this long; after a database error, only this long.
ERROR_BACKOFF = 30.0
DB_ERROR_BACKOFF = 1.0
MAINTENANCE_EVERY = 60.0
MIN_WAIT = 0.02


@dataclass
class Pass:
    """What one pass did."""

    started: list[str] = field(default_factory=list)  # runs queued by schedule ticks
    skipped: int = 0  # ticks skipped by overlap=skip
    missed: int = 0  # ticks left out by catch-up policies
    cancelled: list[str] = field(default_factory=list)  # runs stopped by cancel_previous
    fired: list[str] = field(default_factory=list)  # runs queued by triggers and sensors
    errors: dict[str, str] = field(default_factory=dict)  # schedule or trigger -> why


def _load(name: str, entrypoint: str | None) -> Workflow[Any, Any]:
    from keel.engine.api import locate_workflow

    return locate_workflow(name, entrypoint)


class Scheduler:
    def __init__(
        self,
        store: MetadataStore | None = None,
        *,
        now: Clock | None = None,
        trigger_interval: float = 1.0,
        sync_declared: bool = True,
    ) -> None:
        self.store = store or open_store()
        self._clock = now
        self.trigger_interval = trigger_interval
        self.sync_declared = sync_declared
        self._synced: set[str] = set()
        self._last_triggers = float("-inf")
        self._last_maintenance = time.monotonic()
        self._last_poll: dict[str, float] = {}
        self._quiet_until: dict[str, float] = {}
        self.last_errors: dict[str, str] = {}

    def now(self) -> float:
        if self._clock is None:
            return time.time()
        value = self._clock()
        return value.timestamp() if isinstance(value, datetime) else float(value)

    # -- one pass ---------------------------------------------------------------------
    def tick(self) -> Pass:
        """Start every due tick, evaluate triggers and sensors that are due a look."""
        result = Pass()
        if self.sync_declared:
            self._sync(result)
        now = self.now()
        try:
            due = schedules.due(self.store, now)
        except sa.exc.SQLAlchemyError as exc:
            result.errors["(schedules)"] = str(exc).splitlines()[0]
            due = []
        for name in due:
            if self._resting(name):
                continue
            try:
                out = schedules.run_due(self.store, name, now, _load)
            except Exception as exc:
                self._failed(result, name, exc)
                continue
            result.started += out.started
            result.skipped += len(out.skipped)
            result.missed += out.missed
            result.cancelled += out.cancelled
        if time.monotonic() - self._last_triggers >= self.trigger_interval:
            self._last_triggers = time.monotonic()
            self._triggers(result)
        if time.monotonic() - self._last_maintenance >= MAINTENANCE_EVERY:
            self._last_maintenance = time.monotonic()
            try:
                backfill.prune_pools(self.store)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("pruning finished backfill pools failed: %s", exc)
        return result

    def _triggers(self, result: Pass) -> None:
        try:
            found = [t for t in triggers.ls(store=self.store) if t.enabled and t.kind != "webhook"]
        except sa.exc.SQLAlchemyError as exc:
            result.errors["(triggers)"] = str(exc).splitlines()[0]
            return
        for info in found:
            key = f"trigger {info.name}"
            if self._resting(key):
                continue
            try:
                if info.kind == "files":
                    last = self._last_poll.get(info.name, float("-inf"))
                    if time.monotonic() - last < info.config["poll_seconds"]:
                        continue
                    self._last_poll[info.name] = time.monotonic()
                    result.fired += sensors.poll(self.store, info.name, info.config, _load)
                else:
                    finder = triggers.FINDERS[info.kind]
                    result.fired += triggers.fire_causes(self.store, info.name, finder, _load)
            except Exception as exc:
                self._failed(result, key, exc)

    def _sync(self, result: Pass) -> None:
        """Register schedules declared in code loaded since the last pass."""
        wanted = schedules.declared()
        new = {name: v for name, v in wanted.items() if name not in self._synced}
        for name, (wf, _spec) in new.items():
            self._synced.add(name)
            try:
                schedules.sync(wf, store=self.store)
            except Exception as exc:
                self._failed(result, name, exc)

    def _resting(self, key: str) -> bool:
        return time.monotonic() < self._quiet_until.get(key, 0.0)

    def _failed(self, result: Pass, key: str, exc: Exception) -> None:
        text = exc.message if isinstance(exc, KeelError) else f"{type(exc).__name__}: {exc}"
        text = text.splitlines()[0] if text else type(exc).__name__
        database = isinstance(exc, sa.exc.SQLAlchemyError)
        self._quiet_until[key] = time.monotonic() + (
            DB_ERROR_BACKOFF if database else ERROR_BACKOFF
        )
        result.errors[key] = text
        if self.last_errors.get(key) != text:
            log.error("scheduler: %s: %s", key, text)
        self.last_errors[key] = text

    # -- a loop ---------------------------------------------------------------------------
    def seconds_to_next(self, cap: float = 1.0) -> float:
        """How long until the nearest schedule tick (at most `cap`)."""
        try:
            with self.store.engine.connect() as conn:
                soonest = conn.execute(
                    sa.select(sa.func.min(schedule_rows.c.next_tick)).where(
                        schedule_rows.c.paused.is_(False)
                    )
                ).scalar()
        except sa.exc.SQLAlchemyError:
            return cap
        if soonest is None:
            return cap
        # Never spin: a due schedule resting after an error is left for a while.
        return max(MIN_WAIT, min(cap, float(soonest) - self.now()))

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        max_wait: float = 1.0,
        on_pass: Callable[[Pass], None] | None = None,
    ) -> None:
        """Pass after pass until `stop` is set: each pass right when the nearest tick
        is due, and at least every `max_wait` seconds (for triggers and sensors)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            result = self.tick()
            if on_pass is not None:
                on_pass(result)
            stop.wait(self.seconds_to_next(max_wait))
