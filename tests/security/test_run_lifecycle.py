"""Issue #9, items 9, 11, 12 and 13: no run stays RUNNING when nothing runs it.

Real `keel` subprocesses, real SIGTERM and SIGKILL, real faults (a write to /dev/full
for a full disk, an address-space cap for an allocation that cannot be served), on
SQLite and PostgreSQL (the `backend` fixture). Steps append to marker files so the
tests count how often each really ran; waits are bounded polls on files or the store.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import keel
from keel.engine.children import DEFAULT_MAX_CHILD_DEPTH, max_child_depth
from keel.errors import ConfigError
from keel.store.metadata import open_store
from keel.store.schema import queue_items, runs, steps

WAIT_SECONDS = 120.0
RUN_ID = re.compile(r"\brun ([0-9a-z]{16})\b")

pytestmark = pytest.mark.integration

FLOWS = """
import errno
import resource
import sys
import time
from pathlib import Path

import keel


def _mark(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(line + "\\n")


@keel.task
def lc_mark(i: int, marks: str) -> int:
    _mark(marks, str(i))
    return i


@keel.task
def lc_gated(marks: str, gate: str, a: int, b: int) -> int:
    _mark(marks, "gated")
    deadline = time.monotonic() + 120
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.05)
    return a + b + 100


@keel.workflow
def lc_job(marks: str, gate: str) -> int:
    return lc_gated(marks, gate, lc_mark.submit(0, marks), lc_mark.submit(1, marks))


@keel.task
def lc_work(i: int) -> int:
    return i


@keel.workflow
def lc_inner(n: int) -> int:
    return sum(keel.gather(*lc_work.map(range(n))))


@keel.workflow
def lc_queued(n: int = 3) -> int:
    child = lc_inner.submit(n)
    return sum(keel.gather(*lc_work.map(range(n)))) + child.result()


@keel.task
def lc_fill_disk() -> None:
    with open("/dev/full", "wb") as out:  # every write fails with ENOSPC
        out.write(b"x" * 4096)
        out.flush()


@keel.workflow
def lc_disk_full() -> None:
    lc_fill_disk()


@keel.task
def lc_allocate(gib: int) -> int:
    # A memory cap as a container would set it: the address space may grow by 256 MiB.
    size = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), hard))
    try:
        return len(bytearray(gib << 30))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@keel.workflow
def lc_out_of_memory(gib: int = 2) -> int:
    return lc_allocate(gib)


@keel.task
def lc_parse(text: str) -> int:
    return int(text)


@keel.workflow
def lc_code_bug() -> int:
    return lc_parse("twelve")


@keel.workflow
def lc_checked(n: int = -1) -> int:
    if n < 0:
        raise keel.ParameterError(f"n must be 0 or more, got {n}")
    return lc_work(n)


@keel.task
def lc_remote_step(marks: str, gate: str) -> int:
    _mark(marks, "remote")
    deadline = time.monotonic() + 120
    while not Path(gate).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never opened the gate")
        time.sleep(0.05)
    return 7


@keel.workflow
def lc_remote(marks: str, gate: str) -> int:
    return lc_remote_step(marks, gate)


if __name__ == "__main__":
    keel.run(lc_job, marks=sys.argv[1], gate=sys.argv[2])
"""


# -- helpers ---------------------------------------------------------------------------
@pytest.fixture
def flows(tmp_path: Path) -> Path:
    path = tmp_path / "lc_flows.py"
    path.write_text(FLOWS, encoding="utf-8")
    return path


def start(*args: str | Path, logs: Path) -> subprocess.Popen[bytes]:
    """A process on this test's store (KEEL_HOME / KEEL_DB_URL come from the fixtures);
    output to files, so a pipe no one reads cannot stall it."""
    name = f"proc-{time.monotonic_ns()}"
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, *map(str, args)], stdout=out, stderr=err)
    proc.out_path = logs / f"{name}.out"  # type: ignore[attr-defined]
    proc.err_path = logs / f"{name}.err"  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    out = proc.out_path.read_text(errors="replace")  # type: ignore[attr-defined]
    err = proc.err_path.read_text(errors="replace")  # type: ignore[attr-defined]
    return out, err


def keel_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )


def wait_until(what: str, condition: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if proc.poll() is not None:
            out, err = output(proc)
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"gave up after {WAIT_SECONDS:.0f} s waiting for {what}")
        time.sleep(0.05)


def lines(path: Path) -> Counter[str]:
    try:
        return Counter(path.read_text(encoding="utf-8").splitlines())
    except FileNotFoundError:
        return Counter()


def select(stmt: Any) -> list[Any]:
    with open_store().engine.connect() as conn:
        return list(conn.execute(stmt))


def only_run(workflow: str) -> Any:
    found = select(sa.select(runs).where(runs.c.workflow == workflow, runs.c.parent_id.is_(None)))
    assert len(found) == 1, found
    return found[0]


def run_tree(root: str) -> list[Any]:
    """The run and its child runs (child ids extend the root's)."""
    return select(sa.select(runs).where(sa.or_(runs.c.id == root, runs.c.id.like(f"{root}.%"))))


def open_steps(ids: list[str]) -> list[Any]:
    return select(
        sa.select(steps.c.run_id, steps.c.key, steps.c.status).where(
            steps.c.run_id.in_(ids), steps.c.status.in_(("RUNNING", "PENDING"))
        )
    )


def queue_of(ids: list[str], kind: str) -> list[Any]:
    """The work items (`kind` step or run) of these runs."""
    return select(
        sa.select(queue_items).where(queue_items.c.run_id.in_(ids), queue_items.c.kind == kind)
    )


# -- item 9: SIGTERM --------------------------------------------------------------------
def test_sigterm_cancels_keel_run_and_resume_finishes_it(
    backend: str, tmp_path: Path, flows: Path
) -> None:
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    proc = start(
        "-m", "keel", "run", f"{flows}:lc_job", "-p", f"marks={marks}", "-p", f"gate={gate}",
        logs=tmp_path,
    )  # fmt: skip
    wait_until("the gated step to start", lambda: lines(marks)["gated"] == 1, proc)

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=WAIT_SECONDS) == 143, output(proc)

    out, err = output(proc)
    assert "Traceback" not in out + err
    run = only_run("lc_job")
    assert f"run {run.id} cancelled (SIGTERM)" in err
    assert f"keel resume {run.id}" in err
    assert run.status == "CANCELLED"
    assert "SIGTERM" in run.error_message
    recorded = {s.key: s.status for s in keel.Client().run(run.id).steps}
    assert recorded == {
        "lc_mark-0": "SUCCEEDED",
        "lc_mark-1": "SUCCEEDED",
        "lc_gated-2": "CANCELLED",
    }

    gate.touch()
    resumed = keel_cli("resume", run.id)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "result: 101" in resumed.stdout
    assert keel.Client().run(run.id).status == "SUCCEEDED"
    # Recorded steps did not run again; the step SIGTERM stopped ran once more.
    assert lines(marks) == Counter({"0": 1, "1": 1, "gated": 2})


def test_sigterm_of_a_python_keel_run_records_the_run_then_ends_the_process(
    backend: str, tmp_path: Path, flows: Path
) -> None:
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    proc = start(flows, marks, gate, logs=tmp_path)
    wait_until("the gated step to start", lambda: lines(marks)["gated"] == 1, proc)

    os.kill(proc.pid, signal.SIGTERM)

    # The process still ends by SIGTERM, as the program's caller expects...
    assert proc.wait(timeout=WAIT_SECONDS) == -signal.SIGTERM, output(proc)
    # ...but first the run is recorded as stopped, with nothing left open.
    run = only_run("lc_job")
    assert run.status == "CANCELLED"
    assert "SIGTERM" in run.error_message
    assert open_steps([run.id]) == []


# -- item 11: cancel closes steps, child runs and queue items ----------------------------
def start_queued_run(tmp_path: Path, flows: Path) -> tuple[subprocess.Popen[bytes], Any]:
    """`keel run --executor queue` with no worker: its steps (and its child run's) wait
    in the queue and are RUNNING in the record."""
    proc = start("-m", "keel", "run", f"{flows}:lc_queued", "--executor", "queue", logs=tmp_path)

    def queued() -> bool:
        found = select(sa.select(runs.c.id).where(runs.c.workflow == "lc_queued"))
        if not found:
            return False
        ids = [found[0].id, f"{found[0].id}.0"]
        return len(queue_of(ids, "step")) == 6 and len(open_steps(ids)) == 7

    wait_until("six queued steps, seven recorded as RUNNING", queued, proc)
    return proc, only_run("lc_queued")


def assert_closed(root: str) -> None:
    tree = run_tree(root)
    assert len(tree) == 2  # the run and its child run
    assert {r.status for r in tree} == {"CANCELLED"}
    ids = [r.id for r in tree]
    assert open_steps(ids) == []
    cancelled = select(sa.select(steps.c.key).where(steps.c.run_id.in_(ids)))
    assert len(cancelled) == 7  # 3 steps + the child-run step; the child's 3 steps
    assert {r.status for r in select(sa.select(steps.c.status).where(steps.c.run_id.in_(ids)))} == {
        "CANCELLED"
    }
    assert queue_of(ids, "step") == []
    # The run's own entry (its owner's lease) is gone or finished: no one takes it over.
    assert {r.status for r in queue_of(ids, "run")} <= {"done"}


def test_cancel_of_a_live_run_closes_its_steps_children_and_queue_items(
    backend: str, tmp_path: Path, flows: Path
) -> None:
    proc, run = start_queued_run(tmp_path, flows)

    asked = keel_cli("cancel", run.id)

    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"asked run {run.id} (RUNNING)" in asked.stdout
    assert proc.wait(timeout=WAIT_SECONDS) == 1, output(proc)
    assert_closed(run.id)


def test_cancel_of_a_run_whose_process_died_closes_its_steps_children_and_queue_items(
    backend: str, tmp_path: Path, flows: Path
) -> None:
    proc, run = start_queued_run(tmp_path, flows)
    proc.kill()
    assert proc.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL

    asked = keel_cli("cancel", run.id)

    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"run {run.id} is now CANCELLED" in asked.stdout
    assert_closed(run.id)


def test_outcomes_no_one_collected_leave_the_queue_when_the_run_ends(
    backend: str, tmp_path: Path, flows: Path
) -> None:
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    worker = start("-m", "keel", "worker", "--no-scheduler", "--load", flows, logs=tmp_path)
    try:
        coordinator = start(
            "-m", "keel", "run", f"{flows}:lc_remote", "--executor", "queue",
            "-p", f"marks={marks}", "-p", f"gate={gate}", logs=tmp_path,
        )  # fmt: skip

        def started() -> bool:
            found = select(sa.select(runs.c.id).where(runs.c.workflow == "lc_remote"))
            return lines(marks)["remote"] == 1 and bool(found) and bool(open_steps([found[0].id]))

        wait_until("the worker to run the step, recorded as RUNNING", started, coordinator)
        rid = only_run("lc_remote").id
        coordinator.kill()  # the coordinator crashes while a worker runs its step
        assert coordinator.wait(timeout=WAIT_SECONDS) == -signal.SIGKILL
        gate.touch()
        wait_until(
            "the worker to finish the step no one waits for",
            lambda: [r.status for r in queue_of([rid], "step")] == ["done"],
            worker,
        )

        resumed = keel_cli("resume", "--force", rid)

        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "result: 7" in resumed.stdout
        # The resume ran the step again as a new attempt; the first attempt's outcome,
        # which nobody collected, went with the run's end.
        assert lines(marks)["remote"] == 2
        assert queue_of([rid], "step") == []
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=WAIT_SECONDS)


# -- item 12: child-run depth -----------------------------------------------------------
@keel.workflow(name="lc_recurse")
def recurse(level: int = 0) -> int:
    return recurse(level + 1) + 1


def test_self_recursive_workflow_stops_at_the_depth_limit(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_MAX_CHILD_DEPTH", "5")

    handle = keel.run(recurse)

    assert handle.status == "FAILED"
    run = keel.Client().run(handle.id)
    assert run.error_type == "keel.errors.ChildDepthError"
    assert "would start at depth 6, over the limit of 5" in run.error_message
    assert "(chain from the root run: lc_recurse (6 times))" in run.error_message
    tree = run_tree(handle.id)
    assert len(tree) == 1 + 5  # the root and exactly `limit` child runs
    assert {r.status for r in tree} == {"FAILED"}  # every child run ended
    assert open_steps([r.id for r in tree]) == []


def test_the_depth_limit_has_a_documented_default_and_checks_its_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KEEL_MAX_CHILD_DEPTH", raising=False)
    assert max_child_depth() == DEFAULT_MAX_CHILD_DEPTH == 32
    for bad in ("0", "-3", "deep"):
        monkeypatch.setenv("KEEL_MAX_CHILD_DEPTH", bad)
        with pytest.raises(ConfigError, match="KEEL_MAX_CHILD_DEPTH"):
            max_child_depth()


# -- item 13: messages never empty, hints that name the right fix ------------------------
def failed_run(flows: Path, workflow: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    result = keel_cli("run", f"{flows}:{workflow}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback (most recent call last)" not in result.stderr
    found = RUN_ID.findall(result.stdout)
    assert found, result.stdout
    return found[0], result


def test_a_full_disk_points_to_resume(backend: str, flows: Path) -> None:
    rid, result = failed_run(flows, "lc_disk_full")
    assert "No space left on device" in result.stdout
    assert f"keel resume {rid}" in result.stdout
    assert "keel retry" not in result.stdout


def test_an_allocation_over_the_memory_cap_has_a_message_and_points_to_resume(
    backend: str, flows: Path
) -> None:
    rid, result = failed_run(flows, "lc_out_of_memory")
    # MemoryError() has the text "": the record and the output still say what happened.
    step = keel.Client().run(rid).step("lc_allocate-0")
    assert step.error_type == "MemoryError"
    assert step.error_message == "MemoryError raised without a message: Out of memory."
    assert keel.Client().run(rid).error_message == step.error_message
    assert "error: MemoryError: MemoryError raised without a message" in result.stdout
    assert f"keel resume {rid}" in result.stdout
    assert "keel retry" not in result.stdout


def test_a_bug_in_the_code_points_to_retry(backend: str, flows: Path) -> None:
    rid, result = failed_run(flows, "lc_code_bug")
    assert "invalid literal for int()" in result.stdout
    assert f"fix the code, then: keel retry {rid}" in result.stdout
    assert "keel resume" not in result.stdout


def test_a_bad_parameter_points_to_a_new_run(backend: str, flows: Path) -> None:
    _, result = failed_run(flows, "lc_checked")
    assert "n must be 0 or more, got -1" in result.stdout
    assert f"start a new run with corrected parameters: keel run {flows}:lc_checked" in (
        result.stdout
    )
    assert "keel resume" not in result.stdout and "keel retry" not in result.stdout
