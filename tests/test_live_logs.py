"""Live logs: what a running step prints is in the store while it still runs (the
step itself waits to see its own first line there), on threads and in worker
processes, without duplicates or reordering in the final record; `keel logs
--follow` prints it as it comes and ends with the run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import keel
from keel.errors import ConfigError

pytestmark = pytest.mark.integration

WAIT_SECONDS = 120.0


def _seen_in_store(run_id: str, text: str, wait: float) -> bool:
    """Whether `text` shows up in the run's recorded logs within `wait` seconds."""
    store = keel.Client().store
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if any(text in row.text for row in store.load_logs(run_id)):
            return True
        time.sleep(0.05)
    return False


@keel.task(name="live_talker")
def talker(wait: float) -> bool:
    """Prints a line, waits to find it recorded, prints another; whether it was found."""
    ctx = keel.context()
    print("first line", flush=True)
    ctx.logger.info("logged while running")
    seen = _seen_in_store(ctx.run_id, "first line", wait)
    print("second line", file=sys.stderr)
    return seen


@keel.workflow(name="live_talk")
def talk(wait: float = WAIT_SECONDS) -> bool:
    return talker(wait)


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_a_running_steps_output_is_recorded_while_it_runs(
    backend: str, executor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_LIVE_LOG_INTERVAL", "0.1")
    monkeypatch.setenv("KEEL_EXECUTOR", executor)
    handle = keel.run(talk)
    assert handle.status == "SUCCEEDED"
    assert handle.result() is True, "the first line was not in the store while the step ran"
    step = keel.Client().run(handle.id).step("live_talker-0")
    rows = keel.Client().store.load_logs(handle.id, step.seq)
    text = "".join(row.text for row in rows)
    assert text.count("first line") == 1
    assert text.count("second line") == 1
    assert text.count("logged while running") == 1
    assert text.index("first line") < text.index("logged while running")
    assert text.index("logged while running") < text.index("second line")
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert {r.stream for r in rows} == {"stdout", "stderr", "log"}


def test_live_logs_can_be_turned_off(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_LIVE_LOG_INTERVAL", "0")
    handle = keel.run(talk, wait=1.5)
    assert handle.status == "SUCCEEDED"
    assert handle.result() is False  # recorded only when the attempt ended
    assert "second line" in keel.Client().run(handle.id).step("live_talker-0").logs()


def test_a_bad_interval_is_a_clear_error(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_LIVE_LOG_INTERVAL", "soon")
    with pytest.raises(ConfigError) as caught:
        keel.run(talk, wait=0.1)
    assert "KEEL_LIVE_LOG_INTERVAL must be a number of seconds" in str(caught.value)
    assert "'soon'" in str(caught.value)
    monkeypatch.delenv("KEEL_LIVE_LOG_INTERVAL")
    assert keel.Client().runs(workflow="live_talk") == []  # nothing half-started
    done = subprocess.run(
        [sys.executable, "-m", "keel", "runs", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, "KEEL_LIVE_LOG_INTERVAL": "-1"},
        timeout=WAIT_SECONDS,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("error: KEEL_LIVE_LOG_INTERVAL must be"), done.stderr


@keel.task(name="live_gated")
def gated(gate: str) -> str:
    print("before the gate", flush=True)
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("after the gate", flush=True)
    return "done"


@keel.workflow(name="live_gate")
def gate_flow(gate: str) -> str:
    return gated(gate)


def test_keel_logs_follow_prints_output_as_it_comes(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_LIVE_LOG_INTERVAL", "0.1")
    gate = tmp_path / "gate"
    result: dict[str, keel.RunHandle] = {}
    runner = threading.Thread(
        target=lambda: result.update(handle=keel.run(gate_flow, gate=str(gate))), daemon=True
    )
    runner.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not keel.Client().runs(workflow="live_gate") and time.monotonic() < deadline:
        time.sleep(0.05)
    run_id = keel.Client().runs(workflow="live_gate")[0].id
    out = tmp_path / "follow.out"
    with open(out, "wb") as sink:
        follower = subprocess.Popen(
            [sys.executable, "-m", "keel", "logs", run_id, "--follow"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    try:
        while "before the gate" not in out.read_text() and time.monotonic() < deadline:
            assert follower.poll() is None, out.read_text()
            time.sleep(0.05)
        assert "before the gate" in out.read_text(), "the follower never printed the first line"
        assert "after the gate" not in out.read_text()
        gate.write_text("open")
        assert follower.wait(timeout=WAIT_SECONDS) == 0, out.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
    runner.join(WAIT_SECONDS)
    assert result["handle"].status == "SUCCEEDED"
    printed = out.read_text()
    assert printed.count("before the gate") == 1
    assert printed.count("after the gate") == 1
    assert printed.index("before the gate") < printed.index("after the gate")
    assert f"{run_id} live_gated-0 · attempt 1" in printed


def test_keel_logs_follow_of_a_finished_run_prints_it_and_returns(backend: str) -> None:
    handle = keel.run(talk, wait=0.1)
    done = subprocess.run(
        [sys.executable, "-m", "keel", "logs", handle.id, "live_talker-0", "-f"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=WAIT_SECONDS,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("first line") == 1
    assert done.stdout.count("second line") == 1


@keel.task(name="live_silent")
def silent() -> int:
    return 1


@keel.workflow(name="live_quiet")
def quiet() -> int:
    return silent()


def test_keel_logs_follow_says_when_nothing_was_printed(backend: str) -> None:
    handle = keel.run(quiet)
    for args in ((handle.id, "live_silent-0", "-f"), (handle.id, "--follow")):
        done = subprocess.run(
            [sys.executable, "-m", "keel", "logs", *args],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
            timeout=WAIT_SECONDS,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == ""
        assert "printed nothing" in done.stderr or "no output was captured" in done.stderr
