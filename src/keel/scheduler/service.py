"""Importing this module makes every `Worker` of the process also run the scheduler:
one pass (schedules, triggers, sensors) per turn of its loop, at most every
`MIN_INTERVAL` seconds. `keel worker` imports it unless given --no-scheduler.
"""

from __future__ import annotations

import time
import weakref

from keel.scheduler.scheduler import Scheduler
from keel.scheduler.worker import Worker, loop_hooks

MIN_INTERVAL = 0.1

_schedulers: weakref.WeakKeyDictionary[Worker, tuple[Scheduler, list[float]]] = (
    weakref.WeakKeyDictionary()
)


def scheduler_pass(worker: Worker) -> None:
    """The worker loop hook: a scheduler pass on the worker's store."""
    entry = _schedulers.get(worker)
    if entry is None:
        entry = _schedulers[worker] = (Scheduler(worker.store), [float("-inf")])
    scheduler, last = entry
    if time.monotonic() - last[0] < MIN_INTERVAL:
        return
    last[0] = time.monotonic()
    scheduler.tick()


def install() -> None:
    if scheduler_pass not in loop_hooks:
        loop_hooks.append(scheduler_pass)


install()
