"""Crash tests: a real subprocess runs a workflow, gets SIGKILL mid-run, and the run
is resumed (in-process with `keel.resume`, or through `keel resume` on the CLI).

What must hold after the resume: the result is right, every step ran at least once,
and no step that the store had recorded as SUCCEEDED at the moment of the kill ran
again. A step in flight at the kill, or whose record was in the last unwritten group
commit, may run twice (at-least-once); a recorded one never does.

The steps append one line each to a side-effect file, so the test counts how many
times each really ran. Waits poll with a generous overall timeout and fail with a
message that says what was awaited; no wall-clock time is asserted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import keel

FLOW_FILE = Path(__file__).parent / "flows" / "crash_flow.py"
N_STEPS = 1000
KILL_AFTER_LINES = 300
WAIT_SECONDS = 180.0
POLL_SECONDS = 0.01

pytestmark = pytest.mark.integration


# -- helpers ---------------------------------------------------------------------------
class FlowProcess:
    """A workflow of the flow file running in a subprocess that uses this test's store.

    Its output goes to files (a pipe nobody reads could fill up and stall it).
    """

    def __init__(self, logs: Path, workflow: str, **params: object) -> None:
        self.stdout = logs / f"{workflow}.stdout"
        self.stderr = logs / f"{workflow}.stderr"
        args = [sys.executable, str(FLOW_FILE), workflow]
        args += [f"{k}={v}" for k, v in params.items()]
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                env=dict(os.environ),  # KEEL_HOME / KEEL_DB_URL as set by the fixtures
                stdout=out,
                stderr=err,
            )

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def report(self) -> str:
        """Exit code and output, for failure messages (kills the process if still alive)."""
        if not self.ended():
            self.proc.kill()
        self.proc.wait(timeout=60)
        out = self.stdout.read_text(errors="replace")
        err = self.stderr.read_text(errors="replace")[-4000:]
        return f"exit code {self.proc.returncode}\nstdout:\n{out}\nstderr:\n{err}"

    def kill_hard(self) -> None:
        """SIGKILL, then reap the process (a zombie would still look alive to resume)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL, f"not killed: {self.report()}"


def read_lines(path: Path) -> list[str]:
    """The complete lines of the side-effect file (a line being written is left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def wait_until(what: str, condition: Callable[[], bool], flow: FlowProcess) -> None:
    """Poll `condition` until it holds; fail saying `what` was awaited if it never does."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if flow.ended():
            pytest.fail(
                f"the workflow process ended before {what} (it should have been killed "
                f"first):\n{flow.report()}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {WAIT_SECONDS:.0f} s waiting for {what}:\n{flow.report()}")
        time.sleep(POLL_SECONDS)


def only_run_id(workflow: str) -> str:
    runs = keel.Client().runs(workflow=workflow)
    assert len(runs) == 1, f"expected one run of {workflow}, found {runs}"
    return runs[0].id


def succeeded_steps(run_id: str) -> dict[str, int]:
    """Step key -> seq of the steps the store records as SUCCEEDED now."""
    run = keel.Client().run(run_id)
    return {s.key: s.seq for s in run.steps if s.status == "SUCCEEDED"}


def crash_fanout_midway(tmp_path: Path) -> tuple[str, Path, dict[str, int]]:
    """Start the 1,000-step run, kill it at about 30 %; its id, effects file, recorded steps."""
    effects = tmp_path / "effects.txt"
    gate = tmp_path / "gate"  # the second half of the steps wait for it: killed mid-way
    flow = FlowProcess(tmp_path, "crash_fanout", n=N_STEPS, out=effects, delay=0.008, gate=gate)
    wait_until(
        f"{KILL_AFTER_LINES} side-effect lines",
        lambda: len(read_lines(effects)) >= KILL_AFTER_LINES,
        flow,
    )
    flow.kill_hard()
    gate.touch()  # the resumed run goes through
    run_id = only_run_id("crash_fanout")
    run = keel.Client().run(run_id)
    assert run.status == "RUNNING", "a killed run stays RUNNING in the store"
    recorded = succeeded_steps(run_id)
    # The kill came mid-run: some steps recorded, but far from all of them.
    assert recorded, "no step was recorded as SUCCEEDED before the kill"
    assert len(recorded) < N_STEPS, "every step was recorded: the kill came too late"
    assert f"crash_total-{N_STEPS}" not in recorded
    return run_id, effects, recorded


def check_fanout_after_resume(run_id: str, effects: Path, recorded: dict[str, int]) -> None:
    run = keel.Client().run(run_id)
    assert run.status == "SUCCEEDED"
    assert run.result() == sum(i * i for i in range(N_STEPS))
    assert len(run.steps) == N_STEPS + 1
    assert all(s.status == "SUCCEEDED" for s in run.steps)
    # The recorded outputs are the right ones, too (read back from the store).
    assert [run.step(f"crash_square-{i}").output() for i in (0, 7, N_STEPS - 1)] == [
        0,
        49,
        (N_STEPS - 1) ** 2,
    ]

    counts = Counter(read_lines(effects))
    expected_lines = {str(i) for i in range(N_STEPS)} | {"total"}
    assert set(counts) == expected_lines, f"unexpected lines: {set(counts) ^ expected_lines}"
    # Every step ran at least once; no step recorded as succeeded before the kill ran again.
    ran_twice = sorted(
        key
        for key, seq in recorded.items()
        if key.startswith("crash_square") and counts[str(seq)] != 1
    )
    assert not ran_twice, f"steps recorded as SUCCEEDED before the kill ran again: {ran_twice}"
    # The resume ran the rest, not everything again: the re-runs are the steps that
    # were not recorded (at most all of them, at-least-once for those in flight).
    reruns = sum(c - 1 for c in counts.values())
    assert reruns <= N_STEPS - len(recorded)
    assert counts.total() < 2 * N_STEPS


# -- the tests -------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_kill9_then_resume_in_process(backend: str, tmp_path: Path) -> None:
    run_id, effects, recorded = crash_fanout_midway(tmp_path)

    handle = keel.resume(run_id)

    assert handle.id == run_id
    assert handle.status == "SUCCEEDED"
    check_fanout_after_resume(run_id, effects, recorded)
    # Resuming a finished run is a no-op that returns its result.
    lines = len(read_lines(effects))
    assert keel.resume(run_id).result() == handle.result()
    assert len(read_lines(effects)) == lines


@pytest.mark.timeout(600)
def test_kill9_then_resume_with_cli(backend: str, tmp_path: Path) -> None:
    run_id, effects, recorded = crash_fanout_midway(tmp_path)

    done = subprocess.run(
        [sys.executable, "-m", "keel", "resume", run_id],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )

    assert done.returncode == 0, f"keel resume failed:\n{done.stdout}\n{done.stderr}"
    assert run_id in done.stdout
    assert "SUCCEEDED" in done.stdout
    check_fanout_after_resume(run_id, effects, recorded)


@pytest.mark.timeout(600)
def test_kill9_during_retry_backoff_then_resume(backend: str, tmp_path: Path) -> None:
    n = 20
    effects = tmp_path / "effects.txt"
    flow = FlowProcess(tmp_path, "crash_backoff", n=n, out=effects)

    def in_backoff() -> bool:
        runs = keel.Client().runs(workflow="crash_backoff")
        if not runs:
            return False
        steps = {s.key: s for s in keel.Client().run(runs[0].id).steps}
        flaky = steps.get(f"backoff_flaky-{n}")
        # The first attempt failed and attempt 2 is scheduled 120 s later.
        return (
            flaky is not None
            and flaky.status == "RUNNING"
            and [a.status for a in flaky.attempts] == ["FAILED"]
        )

    wait_until("the flaky step's first attempt to fail and be recorded", in_backoff, flow)
    flow.kill_hard()

    run_id = only_run_id("crash_backoff")
    recorded = succeeded_steps(run_id)
    assert set(recorded) == {f"backoff_before-{i}" for i in range(n)}
    lines = Counter(read_lines(effects))
    assert lines["flaky-attempt"] == 1
    assert "flaky-ok" not in lines

    handle = keel.resume(run_id)

    assert handle.status == "SUCCEEDED"
    assert handle.result() == sum(sum(range(n)) + i for i in range(n))
    counts = Counter(read_lines(effects))
    expected = (
        {f"before-{i}": 1 for i in range(n)}
        | {f"after-{i}": 1 for i in range(n)}
        | {"flaky-attempt": 2, "flaky-ok": 1, "total": 1}
    )
    assert dict(counts) == expected
    flaky = keel.Client().run(run_id).step(f"backoff_flaky-{n}")
    assert flaky.status == "SUCCEEDED"
    assert flaky.attempts[0].status == "FAILED"
    assert flaky.attempts[-1].status == "SUCCEEDED"
