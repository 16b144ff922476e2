"""Workflows for the schedule, backfill and trigger tests (importable as
`flows.schedule_flows`, so worker threads and processes find them by module name).

Also a script: `python tests/flows/schedule_flows.py race SCHEDULE SECONDS` passes
a scheduler over the store in a tight loop for SECONDS (the two-process race).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from datetime import datetime
from typing import Any

import keel


@keel.workflow(name="sched_echo")
def echo(logical_date: datetime, label: str = "x") -> str:
    """Declares `logical_date` as a datetime: gets an aware datetime."""
    return f"{label}@{logical_date.isoformat()}"


@keel.workflow(name="sched_str")
def str_date(logical_date: str) -> str:
    """Declares `logical_date` as a str: gets the ISO 8601 text."""
    return logical_date


@keel.workflow(name="sched_plain")
def plain(n: int = 1) -> int:
    """No `logical_date` parameter: the date is only on the run's row."""
    return n


def append_line(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{text}\n")


def bump(path: str, delta: int) -> None:
    """`now peak` in a file, under a lock: how many holders at once, and the most ever."""
    with open(path, "a+", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        now, peak = (int(x) for x in (fh.read().split() or ["0", "0"]))
        now += delta
        fh.seek(0)
        fh.truncate()
        fh.write(f"{now} {max(peak, now)}")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)


def read_peak(path: str) -> tuple[int, int]:
    with open(path, encoding="utf-8") as fh:
        now, peak = (int(x) for x in fh.read().split())
    return now, peak


@keel.workflow(name="sched_hold")
def hold(
    logical_date: datetime,
    counter: str,
    log: str,
    label: str,
    seconds: float = 0.4,
    gate: str = "",
) -> str:
    """Holds a slot for `seconds` (or, given a `gate`, until that file exists), counting
    how many runs hold one at once."""
    append_line(log, f"start {label}")
    bump(counter, +1)
    deadline = time.monotonic() + (120 if gate else seconds)
    while time.monotonic() < deadline and not (gate and os.path.exists(gate)):
        time.sleep(min(0.02, seconds) if gate else seconds)
    bump(counter, -1)
    return label


# -- trigger targets -----------------------------------------------------------------------
@keel.workflow(name="trig_upstream")
def upstream(fail: bool = False) -> str:
    if fail:
        raise RuntimeError("upstream failed on purpose")
    return "ok"


@keel.workflow(name="trig_after_run")
def after_run(upstream_run_id: str, upstream_status: str, note: str = "") -> str:
    return f"{upstream_run_id} {upstream_status} {note}".strip()


@keel.workflow(name="trig_after_alias")
def after_alias(model_name: str, model_alias: str, model_version: int) -> str:
    return f"{model_name}@{model_alias}={model_version}"


@keel.workflow(name="trig_on_file")
def on_file(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


@keel.workflow(name="trig_hook")
def hook(n: int, label: str = "hook") -> str:
    return f"{label}:{n}"


class Doubler:
    """A tiny model for the registry (pyfunc flavor)."""

    def predict(self, data: Any) -> Any:
        return [2 * x for x in data]


def race(schedule: str, seconds: float) -> int:
    """Pass a scheduler over the store, as fast as possible, for `seconds`."""
    from keel.scheduler.scheduler import Scheduler

    scheduler = Scheduler(sync_declared=False)
    deadline = time.monotonic() + seconds
    passes = started = 0
    while time.monotonic() < deadline:
        result = scheduler.tick()
        if result.errors:
            print("errors:", result.errors, file=sys.stderr, flush=True)
            return 1
        passes += 1
        started += len(result.started)
    print(f"{os.getpid()} {passes} passes, {started} runs of {schedule}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if sys.argv[1] == "race":
        sys.exit(race(sys.argv[2], float(sys.argv[3])))
    sys.exit(f"unknown command {sys.argv[1:]}")
