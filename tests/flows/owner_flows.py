"""A workflow for the dead-owner tests (tests/security/test_dead_owners.py), run with
`keel run tests/flows/owner_flows.py:gated_chain`, killed mid-run, then taken over.

Each step appends one line `NAME PID` to the side-effect file `out` every time it
really runs, so a test counts executions and sees which process ran them. The
middle step waits for the file `gate`, so the test can kill the run while it waits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import keel

# A bound on the wait for the gate, so a forgotten gate fails instead of hanging.
GATE_BOUND_SECONDS = 300.0


def _mark(out: str, name: str) -> None:
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"{name} {os.getpid()}\n")


@keel.task
def first(out: str) -> int:
    _mark(out, "first")
    return 1


@keel.task
def gated(out: str, gate: str, x: int) -> int:
    _mark(out, "gated")
    end = time.monotonic() + GATE_BOUND_SECONDS
    while not Path(gate).exists():
        if time.monotonic() > end:
            raise TimeoutError(f"the gate {gate} never opened")
        time.sleep(0.05)
    return x + 1


@keel.task
def last(out: str, x: int) -> int:
    _mark(out, "last")
    return x * 10


@keel.workflow
def gated_chain(out: str, gate: str) -> int:
    return last(out, gated(out, gate, first(out)))
