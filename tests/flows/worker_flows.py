"""Workflows for the worker, timer, signal and database-blip tests.

Importable as `flows.worker_flows` (the tests put `tests/` on the path, and on the
PYTHONPATH of the worker processes they start, which find step functions and
workflows by module name). Also a script, to run a workflow in a subprocess that a
test kills:

    python tests/flows/worker_flows.py sleepy out=/tmp/effects.txt seconds=30

Steps append one line to the side-effect file `out` each time they really run
(one `write` in append mode: lines of concurrent writers never interleave), so a
test can count executions.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from typing import Any

import keel

# Queue names the tests' workers serve.
STEPS_QUEUE = "steps"
GPU_QUEUE = "gpu-steps"
PRIO_QUEUE = "prio"


def append_line(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{text}\n")
        fh.flush()


# -- in-process steps around durable waits ---------------------------------------------
@keel.task(name="mark")
def mark(out: str, label: str) -> str:
    append_line(out, label)
    return label


@keel.workflow(name="sleepy")
def sleepy(out: str, seconds: float = 0.2) -> str:
    """A step, a durable sleep, a step."""
    mark(out, "before")
    keel.sleep(seconds)
    mark(out, "after")
    return "woke"


@keel.task(name="needs_file")
def needs_file(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is not there yet")
    return "found"


@keel.workflow(name="fails_then_sleeps")
def fails_then_sleeps(out: str, flag: str, seconds: float) -> str:
    """A step that fails until the file `flag` exists, then a durable sleep, a step."""
    mark(out, "before")
    needs_file(flag)
    keel.sleep(seconds)
    mark(out, "after")
    return "woke"


@keel.workflow(name="approval")
def approval(out: str, timeout: float | None = None) -> Any:
    """A step, then a wait for the signal `approve` (its payload is the result)."""
    mark(out, "before")
    decision = keel.wait_for_signal("approve", timeout=timeout)
    mark(out, "after")
    return decision


@keel.workflow(name="approval_or_timeout")
def approval_or_timeout(timeout: float) -> str:
    """The workflow catches the timeout and carries on."""
    try:
        keel.wait_for_signal("approve", timeout=timeout)
    except keel.SignalTimeoutError:
        return "timed out"
    return "approved"


@keel.workflow(name="two_waits")
def two_waits() -> list[Any]:
    """Two waits for one signal name consume its signals in the order they were sent."""
    first = keel.wait_for_signal("value")
    second = keel.wait_for_signal("value")
    return [first, second]


@keel.workflow(name="wait_then_sleep")
def wait_then_sleep(seconds: float) -> Any:
    """Reads a signal, then parks in a long sleep: the continuation replays the wait."""
    value = keel.wait_for_signal("value")
    keel.sleep(seconds)
    return value


# -- a long in-process run (resumed by replay on another worker) -------------------------
@keel.task(name="slow_step")
def slow_step(i: int, out: str, delay: float) -> int:
    append_line(out, f"{i} {os.getpid()}")
    time.sleep(delay)
    return i


@keel.workflow(name="slow_chain", max_concurrency=2)
def slow_chain(out: str, n: int = 40, delay: float = 0.2) -> int:
    """n steps run on the claiming process's threads, two at a time."""
    return sum(keel.gather(slow_step.map(range(n), out=out, delay=delay)))


# -- steps sent to the shared queue --------------------------------------------------------
@keel.task(name="queued_square", queue=STEPS_QUEUE)
def queued_square(i: int, out: str, delay: float) -> int:
    append_line(out, f"{i} {os.getpid()}")  # which process ran it, too
    if delay:
        time.sleep(delay)
    return i * i


@keel.workflow(name="queued_fanout", max_concurrency=64)
def queued_fanout(out: str, n: int = 500, delay: float = 0.0) -> int:
    """n steps on the `steps` queue (run by workers), summed in-process."""
    return sum(keel.gather(queued_square.map(range(n), out=out, delay=delay)))


@keel.workflow(name="trickle", max_concurrency=64)
def trickle(out: str, n: int = 300, gap: float = 0.03) -> int:
    """n steps on the `steps` queue, submitted one every `gap` seconds whatever the
    state of the others (a body that keeps submitting while the database is down)."""
    futures = []
    for i in range(n):
        futures.append(queued_square.submit(i, out=out, delay=0.0))
        time.sleep(gap)
    return sum(keel.gather(futures))


@keel.workflow(name="parked_sleep")
def parked_sleep(seconds: float) -> str:
    keel.sleep(seconds)
    return "woke"


@keel.task(name="gpu_step", queue=GPU_QUEUE, pool="gpu")
def gpu_step(i: int, counter: str, hold: float) -> int:
    """Counts the steps of the pool running at once in `counter` (`now max` under a lock)."""
    _bump(counter, +1)
    time.sleep(hold)
    _bump(counter, -1)
    return i


def _bump(path: str, delta: int) -> None:
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
    """(running now, most ever running at once) from a counter file of `gpu_step`."""
    with open(path, encoding="utf-8") as fh:
        now, peak = (int(x) for x in fh.read().split())
    return now, peak


@keel.workflow(name="gpu_fanout", max_concurrency=32)
def gpu_fanout(counter: str, n: int = 12, hold: float = 0.3) -> int:
    return len(keel.gather(gpu_step.map(range(n), counter=counter, hold=hold)))


@keel.task(name="nopool_step", queue=STEPS_QUEUE, pool="no-such-pool")
def nopool_step(i: int) -> int:
    return i


@keel.workflow(name="unknown_pool")
def unknown_pool() -> int:
    return nopool_step(1)


@keel.task(name="prio_low", queue=PRIO_QUEUE, priority=1)
def prio_low(i: int, out: str) -> int:
    append_line(out, f"low-{i}")
    return i


@keel.task(name="prio_high", queue=PRIO_QUEUE, priority=9)
def prio_high(i: int, out: str) -> int:
    append_line(out, f"high-{i}")
    return i


@keel.workflow(name="priorities", max_concurrency=64)
def priorities(out: str, n: int = 10) -> int:
    """Low-priority steps submitted first, then high-priority ones, all at once."""
    lows = prio_low.map(range(n), out=out)
    highs = prio_high.map(range(n), out=out)
    return sum(keel.gather(lows)) + sum(keel.gather(highs))


# -- a run for `keel run --submit` ------------------------------------------------------
@keel.workflow(name="hello_queue", queue="submitted")
def hello_queue(name: str = "world") -> str:
    return f"hello {name}"


@keel.task(name="add_one")
def add_one(i: int) -> int:
    return i + 1


@keel.workflow(name="many_steps", max_concurrency=4)
def many_steps(n: int = 2000) -> int:
    """Many quick in-process steps (a run long enough to restart a database under)."""
    return sum(keel.gather(add_one.map(range(n))))


WORKFLOWS = {
    "sleepy": sleepy,
    "approval": approval,
    "slow_chain": slow_chain,
    "queued_fanout": queued_fanout,
    "many_steps": many_steps,
}


def main(argv: list[str]) -> int:
    """`worker_flows.py WORKFLOW key=value ...`: run it durably, print the id and status."""
    name, *pairs = argv
    params: dict[str, Any] = dict(pair.split("=", 1) for pair in pairs)
    handle = keel.run(WORKFLOWS[name], **params)
    print(handle.id, handle.status, flush=True)
    return 0 if handle.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
