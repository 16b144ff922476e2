"""Workflows for the crash tests, run as a script in a subprocess that gets killed.

    python tests/flows/crash_flow.py crash_fanout n=1000 out=/tmp/effects.txt delay=0.008

Run as a script, the workflows record this file's path as their entrypoint, so
`keel.resume(run_id)` or `keel resume RUN_ID` in another process loads them from it.
Every step appends one line to the side-effect file `out` (opened in append mode,
flushed), so a test can count how many times each step really ran.
"""

from __future__ import annotations

import os
import sys
import time

import keel


def append_line(path: str, text: str) -> None:
    """One `write` of a whole line in append mode: concurrent writers never interleave."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{text}\n")
        fh.flush()


# -- 1,000 steps, then a reduce ---------------------------------------------------------
@keel.task(name="crash_square")
def crash_square(i: int, out: str, delay: float, gate: str = "", gate_from: int = 0) -> int:
    """Given a `gate` file, steps from `gate_from` on wait (bounded) until it exists, so
    a test can kill the run while it is certainly mid-way."""
    append_line(out, str(i))
    time.sleep(delay)
    deadline = time.monotonic() + 120
    while gate and i >= gate_from and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return i * i


@keel.task(name="crash_total")
def crash_total(values: list[int], out: str) -> int:
    append_line(out, "total")
    return sum(values)


@keel.workflow(name="crash_fanout", max_concurrency=4)
def crash_fanout(out: str, n: int = 1000, delay: float = 0.008, gate: str = "") -> int:
    """n steps squaring their index (each a line in `out`), then their sum. Given a
    `gate` file, the second half of the steps wait for it."""
    squares = crash_square.map(range(n), out=out, delay=delay, gate=gate, gate_from=n // 2)
    return crash_total(squares, out)


# -- a step that fails once and waits a long backoff before its retry ----------------------
@keel.task(name="backoff_before")
def backoff_before(i: int, out: str) -> int:
    append_line(out, f"before-{i}")
    return i


@keel.task(name="backoff_flaky", retries=2, retry_delay=120.0, retry_jitter=0.0)
def backoff_flaky(values: list[int], out: str) -> int:
    """Fails on its first attempt ever (a marker file remembers it), then succeeds."""
    append_line(out, "flaky-attempt")
    marker = out + ".failed-once"
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write("1\n")
        raise RuntimeError("first attempt of backoff_flaky fails on purpose")
    append_line(out, "flaky-ok")
    return sum(values)


@keel.task(name="backoff_after")
def backoff_after(i: int, out: str, base: int) -> int:
    append_line(out, f"after-{i}")
    return base + i


@keel.task(name="backoff_total")
def backoff_total(values: list[int], out: str) -> int:
    append_line(out, "total")
    return sum(values)


@keel.workflow(name="crash_backoff")
def crash_backoff(out: str, n: int = 20) -> int:
    """n steps; a flaky step on their sum (retried after 120 s); n steps after it; a sum."""
    firsts = backoff_before.map(range(n), out=out)
    flaky = backoff_flaky.submit(firsts, out)
    afters = backoff_after.map(range(n), out=out, base=flaky)
    return backoff_total(afters, out)


WORKFLOWS = {"crash_fanout": crash_fanout, "crash_backoff": crash_backoff}


def main(argv: list[str]) -> int:
    """`crash_flow.py WORKFLOW key=value ...`: run it durably, print the id and status."""
    name, *pairs = argv
    params = dict(pair.split("=", 1) for pair in pairs)
    handle = keel.run(WORKFLOWS[name], **params)
    print(handle.id, handle.status, flush=True)
    return 0 if handle.status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
