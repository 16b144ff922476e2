"""Durable timers (`keel.sleep`) and signals (`keel.wait_for_signal`, `keel.signal`,
`keel signal`) on SQLite and PostgreSQL.

A short wait blocks the workflow body; a wait longer than SUSPEND_AFTER parks the
run (PENDING, queued with not_before = its wake time) and whoever claims it when it
wakes continues it by replay: the foreground `keel.run`, a worker, or a new process
after the one that set the timer was killed. Replay neither sleeps again for time
already slept nor sees other signal payloads. Times are compared only between
records (a recorded wake time against a later one), never against the wall clock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import keel
from flows import worker_flows as flows
from flows.worker_support import (  # reap_processes: an autouse fixture
    InThread,
    WorkerProcess,
    flow_process,
    only_run_id,
    queue_rows,
    read_lines,
    reap_processes,  # noqa: F401
    run_queue_row,
    run_row,
    steps_by_key,
    store,
    wait_until,
)
from keel.engine.waits import SUSPEND_AFTER
from keel.errors import RunNotFoundError, RunStateError
from keel.scheduler.worker import Worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

LONG = SUSPEND_AFTER + 3  # a wait that parks the run
# A parked wait a test inspects before it ends: long enough that the foreground does
# not continue the run first while a loaded machine holds the test thread up.
PARKED = SUSPEND_AFTER + 10


class ThreadWorker:
    """A `Worker` on a thread of the test, serving the default queue."""

    def __init__(self, *queues: str) -> None:
        self.worker = Worker(queues=queues or ("default",), concurrency=2, poll_seconds=0.05)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the worker thread did not stop"


def wait_status(run_id: str, status: str, *procs: Any) -> Any:
    wait_until(f"run {run_id} to be {status}", lambda: run_row(run_id).status == status, *procs)
    return run_row(run_id)


def wait_parked(workflow: str, *procs: Any) -> str:
    """The id of the one run of `workflow`, once it is parked (PENDING with a wake time)."""

    def parked() -> bool:
        runs = keel.Client().runs(workflow=workflow)
        return bool(runs) and run_row(runs[0].id).status == "PENDING"

    wait_until(f"a parked run of {workflow}", parked, *procs)
    return only_run_id(workflow)


def recorded_wait(run_id: str, key: str) -> dict[str, Any]:
    """The deadline a timer/signal step records while it waits."""
    row = steps_by_key(run_id)[key]
    assert row.status == "RUNNING", f"{key} is {row.status}"
    return dict(json.loads(row.output_inline))


# -- timers --------------------------------------------------------------------------------
def test_short_sleep_blocks_inside_the_run(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "effects.txt"
    handle = keel.run(flows.sleepy, out=str(out), seconds=0.2)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == "woke"
    steps = steps_by_key(handle.id)
    assert [(k, s.kind, s.status) for k, s in sorted(steps.items(), key=lambda i: i[1].seq)] == [
        ("mark-0", "task", "SUCCEEDED"),
        ("sleep-1", "timer", "SUCCEEDED"),
        ("mark-2", "task", "SUCCEEDED"),
    ]
    assert read_lines(out) == ["before", "after"]
    # The run's entry is held by the `keel.run` that drives it (its owner's lease);
    # a park would re-arm it and the foreground would claim it a second time.
    entries = [(r.status, r.claims) for r in queue_rows(run_id=handle.id)]
    assert entries == [("done", 1)], "a short sleep does not park the run"


def test_long_sleep_parks_the_run_and_the_foreground_continues_it(
    backend: str, tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    running = InThread(flows.sleepy, out=str(out), seconds=PARKED)
    run_id = wait_parked("sleepy")
    wake_at = recorded_wait(run_id, "sleep-1")["wake_at"]
    parked = run_row(run_id)
    assert parked.wake_at == pytest.approx(wake_at)
    item = run_queue_row(run_id)
    assert (item.kind, item.status, item.claimed_by) == ("run", "queued", None)
    assert item.not_before == pytest.approx(wake_at), "queued to be claimed when it wakes"
    assert read_lines(out) == ["before"]

    handle = running.join()
    assert handle.id == run_id
    assert handle.status == "SUCCEEDED"
    assert handle.result() == "woke"
    steps = steps_by_key(run_id)
    assert steps["sleep-1"].status == "SUCCEEDED"
    assert steps["sleep-1"].ended_at >= wake_at
    assert read_lines(out) == ["before", "after"], "the step before the sleep ran once"
    assert run_queue_row(run_id).status == "done"


def test_a_retry_that_parks_is_followed_to_its_end_like_a_run(backend: str, tmp_path: Path) -> None:
    out, flag = tmp_path / "effects.txt", tmp_path / "flag"
    first = keel.run(flows.fails_then_sleeps, out=str(out), flag=str(flag), seconds=LONG)
    assert first.status == "FAILED"
    flag.touch()
    again = keel.retry(first.id)  # its sleep parks the new run; the caller waits it out
    assert again.status == "SUCCEEDED"
    assert again.result() == "woke"
    assert read_lines(out) == ["before", "after"]  # "before" reused from the first run
    assert run_queue_row(again.id).status == "done"


@pytest.mark.parametrize("picker", ["worker-thread", "worker-process", "keel-resume"])
def test_a_timer_outlives_the_process_that_set_it(
    backend: str, tmp_path: Path, picker: str
) -> None:
    out = tmp_path / "effects.txt"
    flow = flow_process(tmp_path, "sleepy", out=out, seconds=PARKED)
    run_id = wait_parked("sleepy", flow)
    wake_at = recorded_wait(run_id, "sleep-1")["wake_at"]
    flow.kill_hard()
    assert run_row(run_id).status == "PENDING"
    assert read_lines(out) == ["before"]

    # Nothing of the killed process is needed: whoever picks the run up continues it.
    if picker == "worker-thread":
        worker = ThreadWorker()
        try:
            wait_status(run_id, "SUCCEEDED")
        finally:
            worker.stop()
    elif picker == "worker-process":
        proc = WorkerProcess(tmp_path, "worker", "default")
        wait_status(run_id, "SUCCEEDED", proc)
        assert proc.terminate() == 0, proc.report()
    else:
        resumed = subprocess.run(
            [sys.executable, "-m", "keel", "resume", run_id],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "SUCCEEDED" in resumed.stdout

    run = keel.Client().run(run_id)
    assert run.status == "SUCCEEDED"
    assert run.result() == "woke"
    steps = steps_by_key(run_id)
    assert steps["sleep-1"].status == "SUCCEEDED"
    assert steps["sleep-1"].ended_at >= wake_at, "it woke no earlier than recorded"
    assert read_lines(out) == ["before", "after"], "the step before the sleep was not re-run"


def test_replay_does_not_sleep_again_for_time_already_slept(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "effects.txt"
    # Long enough that the replay below comes well before the wake time.
    flow = flow_process(tmp_path, "sleepy", out=out, seconds=SUSPEND_AFTER + 60)
    run_id = wait_parked("sleepy", flow)
    wake_at = recorded_wait(run_id, "sleep-1")["wake_at"]
    flow.kill_hard()

    # Make the parked run claimable before its wake time (as a signal does): the worker
    # replays it, the sleep finds its recorded wake time and parks again until then,
    # not for another full duration from now.
    from keel.store import queue

    queue.wake_run(store(), run_id)
    first_claims = run_queue_row(run_id).claims
    worker = ThreadWorker()
    try:
        wait_until(
            "the replayed run to park again",
            lambda: (
                run_queue_row(run_id).claims > first_claims
                and run_queue_row(run_id).status == "queued"
                and run_row(run_id).status == "PENDING"
            ),
        )
        assert run_row(run_id).wake_at == pytest.approx(wake_at, abs=1e-6)
        assert run_queue_row(run_id).not_before == pytest.approx(wake_at, abs=1e-6)
        assert recorded_wait(run_id, "sleep-1")["wake_at"] == pytest.approx(wake_at, abs=1e-6)
    finally:
        worker.stop()
    assert read_lines(out) == ["before"], "the step before the sleep was replayed, not re-run"


# -- signals -------------------------------------------------------------------------------
def test_a_signal_sent_before_the_wait_is_kept(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "effects.txt"
    handle = keel.submit(flows.approval, out=str(out))
    assert handle.status == "PENDING"
    keel.signal(handle.id, "approve", {"ok": True, "by": "alice"})
    worker = ThreadWorker()
    try:
        wait_status(handle.id, "SUCCEEDED")
    finally:
        worker.stop()
    assert handle.result() == {"ok": True, "by": "alice"}
    step = steps_by_key(handle.id)["signal:approve-1"]
    assert (step.kind, step.status) == ("signal", "SUCCEEDED")
    assert read_lines(out) == ["before", "after"]


def test_a_signal_sent_while_the_run_waits_wakes_it(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "effects.txt"
    running = InThread(flows.approval, out=str(out))
    run_id = wait_parked("approval")
    recorded = recorded_wait(run_id, "signal:approve-1")
    assert recorded == {"deadline": None, "signal": "approve"}
    # Waiting without a timeout: queued far ahead, until the signal makes it due.
    far = run_queue_row(run_id).not_before
    keel.signal(run_id, "approve", "yes")
    handle = running.join()
    assert handle.status == "SUCCEEDED"
    assert handle.result() == "yes"
    assert run_queue_row(run_id).not_before < far
    assert read_lines(out) == ["before", "after"]


@pytest.mark.parametrize("timeout", [0.2, LONG], ids=["short", "parked"])
def test_a_signal_timeout_is_an_error_the_workflow_can_catch(backend: str, timeout: float) -> None:
    handle = keel.run(flows.approval_or_timeout, timeout=timeout)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == "timed out"
    step = steps_by_key(handle.id)["signal:approve-0"]
    assert step.status == "FAILED"
    assert step.error_type == "keel.errors.SignalTimeoutError"


def test_an_uncaught_signal_timeout_fails_the_run_saying_how_to_send_it(
    backend: str, tmp_path: Path
) -> None:
    handle = keel.run(flows.approval, out=str(tmp_path / "effects.txt"), timeout=0.2)
    assert handle.status == "FAILED"
    with pytest.raises(keel.RunFailedError) as caught:
        handle.result()
    assert "SignalTimeoutError" in str(caught.value) or "approve" in str(caught.value)
    row = run_row(handle.id)
    assert row.error_type == "keel.errors.SignalTimeoutError"
    assert "approve" in row.error_message


def test_two_signals_of_one_name_are_consumed_in_order(backend: str) -> None:
    handle = keel.submit(flows.two_waits)
    keel.signal(handle.id, "value", 1)
    keel.signal(handle.id, "value", {"second": [2]})
    worker = ThreadWorker()
    try:
        wait_status(handle.id, "SUCCEEDED")
    finally:
        worker.stop()
    assert handle.result() == [1, {"second": [2]}]


def test_two_waits_one_signal_before_one_after(backend: str) -> None:
    running = InThread(flows.two_waits)
    run_id = wait_parked("two_waits")
    keel.signal(run_id, "value", "a")
    wait_until(
        "the second wait to park the run",
        lambda: (
            "signal:value-1" in steps_by_key(run_id)
            and run_row(run_id).status == "PENDING"
            and run_queue_row(run_id).status == "queued"
        ),
    )
    keel.signal(run_id, "value", "b")
    assert running.join().result() == ["a", "b"]


def test_replay_sees_the_same_signal_payload(backend: str) -> None:
    running = InThread(flows.wait_then_sleep, seconds=PARKED)
    run_id = wait_parked("wait_then_sleep")
    keel.signal(run_id, "value", "first")
    wait_until(
        "the run to park in its sleep",
        lambda: "sleep-1" in steps_by_key(run_id) and run_row(run_id).status == "PENDING",
    )
    # Another signal of that name while it sleeps: it wakes the run, whose replay of
    # the wait returns the recorded payload, not this one.
    keel.signal(run_id, "value", "second")
    handle = running.join()
    assert handle.result() == "first"
    assert steps_by_key(run_id)["signal:value-0"].status == "SUCCEEDED"
    from keel.store.schema import signals

    with store().engine.connect() as conn:
        unread = conn.execute(
            signals.select().where(signals.c.run_id == run_id, signals.c.consumed_seq.is_(None))
        ).all()
    assert [json.loads(r.payload) for r in unread] == ["second"]


def test_signalling_a_finished_or_unknown_run_is_a_clear_error(backend: str) -> None:
    done = keel.run(flows.approval_or_timeout, timeout=0)
    assert done.status == "SUCCEEDED"
    with pytest.raises(RunStateError, match="SUCCEEDED: it will never read signal 'approve'"):
        keel.signal(done.id, "approve", True)
    with pytest.raises(RunNotFoundError, match="no run with id"):
        keel.signal("nosuchrun0000000", "approve", True)
    running = InThread(flows.two_waits)
    run_id = wait_parked("two_waits")
    with pytest.raises(RunStateError, match="must be JSON data"):
        keel.signal(run_id, "value", {1, 2})
    keel.signal(run_id, "value", 1)
    keel.signal(run_id, "value", 2)
    assert running.join().result() == [1, 2]


# -- `keel signal` -----------------------------------------------------------------------
def keel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args], capture_output=True, text=True, timeout=120
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    both = result.stdout + result.stderr
    assert result.returncode == code, both
    assert result.stderr.startswith("error: "), both
    assert "Traceback" not in both, both
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"


def test_keel_signal_command(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "effects.txt"
    handle = keel.submit(flows.approval, out=str(out))
    sent = keel_cli("signal", handle.id[:10], "approve", "--data", '{"approved": true}')
    assert sent.returncode == 0, sent.stderr
    assert f"sent signal 'approve' to run {handle.id}" in sent.stdout
    assert_clean_error(
        keel_cli("signal", handle.id, "approve", "--data", "{approved: true}"),
        2,
        "--data is not valid JSON",
    )
    assert_clean_error(keel_cli("signal", "nosuchrun", "approve"), 2, "no run with id 'nosuchrun'")
    worker = ThreadWorker()
    try:
        wait_status(handle.id, "SUCCEEDED")
    finally:
        worker.stop()
    assert handle.result() == {"approved": True}
    assert_clean_error(keel_cli("signal", handle.id, "approve"), 1, f"run {handle.id} is SUCCEEDED")
