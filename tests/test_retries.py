"""Retries with exponential backoff, `retry_on` filtering and per-attempt timeouts, on
the threads and the processes executor. Attempts leave lines in a file (steps may run
in other processes), so the tests count them and compare their times."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

import keel
from keel.engine.retries import retry_delay, should_retry
from keel.executors.base import failure

# -- helpers and tasks (module level: the processes executor pickles them by reference) --


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# Generous, so that a worker process's start-up never decides the outcome; the
# tests sleeping past it wait this long, never longer.
TIMEOUT = 2.0


class FlakyNetworkError(ConnectionError):
    """A custom error: retried by `retry_on=ConnectionError` (a base class of it)."""


@keel.task(name="retry_timed", retries=3, retry_delay=0.05, retry_backoff=4, retry_jitter=0)
def timed(path: str, fail_times: int) -> int:
    attempt = keel.context().attempt
    _append(path, f"{attempt} {time.monotonic()}")
    if attempt <= fail_times:
        raise RuntimeError(f"attempt {attempt} fails")
    return attempt


@keel.task(name="retry_always_fails", retries=2, retry_delay=0)
def always_fails(path: str) -> int:
    _append(path, str(keel.context().attempt))
    raise RuntimeError("never works")


@keel.task(name="retry_lookup_only", retries=2, retry_delay=0, retry_on=LookupError)
def lookup_only(path: str, kind: str) -> str:
    attempt = keel.context().attempt
    _append(path, f"{kind} {attempt}")
    if attempt < 3:
        if kind == "key":
            raise KeyError("missing")  # a LookupError: retried
        if kind == "value":
            raise ValueError("wrong")  # not a LookupError: not retried
    return f"{kind} ok on {attempt}"


@keel.task(name="retry_network", retries=3, retry_delay=0, retry_on=ConnectionError)
def network(path: str) -> int:
    attempt = keel.context().attempt
    _append(path, str(attempt))
    if attempt < 3:
        raise FlakyNetworkError(f"connection reset on attempt {attempt}")
    return attempt


@keel.task(name="retry_sleepy", timeout=TIMEOUT)
def sleepy(path: str, seconds: float) -> str:
    _append(path, f"start {keel.context().attempt}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # small sleeps: a timed-out thread unwinds soon
        time.sleep(0.01)
    _append(path, "end")
    return "woke"


@keel.task(name="retry_slow_first", timeout=TIMEOUT, retries=2, retry_delay=0, retry_on=KeyError)
def slow_first(path: str) -> int:
    attempt = keel.context().attempt
    _append(path, f"start {attempt}")
    if attempt == 1:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.01)
    return attempt


@keel.workflow(name="retry_one")
def one(path: str, which: str, arg: int = 0, kind: str = "") -> object:
    if which == "timed":
        return timed(path, arg)
    if which == "always":
        return always_fails(path)
    if which == "lookup":
        return lookup_only(path, kind)
    if which == "network":
        return network(path)
    if which == "sleepy":
        return sleepy(path, float(arg))
    if which == "slow_first":
        return slow_first(path)
    raise AssertionError(which)


@pytest.fixture(params=["threads", "processes"])
def executor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KEEL_EXECUTOR", request.param)
    return str(request.param)


def _run(tmp_path: Path, which: str, **params: object) -> tuple[keel.Run, Path]:
    out = tmp_path / "attempts.txt"
    handle = keel.run(one, path=str(out), which=which, **params)
    return keel.Client().run(handle.id), out


# -- backoff ---------------------------------------------------------------------------


def test_backoff_delays_grow(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "timed", arg=3)
    assert run.status == "SUCCEEDED"
    assert run.result() == 4
    step = run.steps[0]
    assert [(a.number, a.status) for a in step.attempts] == [
        (1, "FAILED"),
        (2, "FAILED"),
        (3, "FAILED"),
        (4, "SUCCEEDED"),
    ]
    assert all(a.error_type == "RuntimeError" for a in step.attempts[:3])
    records = [line.split() for line in _lines(out)]
    assert [int(n) for n, _ in records] == [1, 2, 3, 4]
    times = [float(t) for _, t in records]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Delays of 0.05, 0.2 and 0.8 s: each wait is at least its own, growing delay.
    # (Not compared with each other: the time to record a failure and dispatch the
    # next attempt varies on a loaded machine by more than the first two differ.)
    for gap, delay in zip(gaps, [0.05, 0.2, 0.8], strict=True):
        assert gap >= delay * 0.95


def test_retries_exhausted(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "always")
    assert run.status == "FAILED"
    assert _lines(out) == ["1", "2", "3"]
    step = run.steps[0]
    assert step.status == "FAILED"
    assert [a.status for a in step.attempts] == ["FAILED"] * 3
    assert all("never works" in (a.traceback or "") for a in step.attempts)
    assert run.error_message == "never works"


def test_retry_delay_schedule() -> None:
    t = keel.task(retry_delay=1.0, retry_backoff=3, retry_jitter=0, retry_max_delay=20)(
        lambda: None
    )
    assert [retry_delay(t.opts, n) for n in range(1, 6)] == [1.0, 3.0, 9.0, 20.0, 20.0]

    jittery = t.with_options(retry_jitter=0.5)
    for n, base in [(1, 1.0), (2, 3.0), (3, 9.0)]:
        samples = [retry_delay(jittery.opts, n) for _ in range(200)]
        assert all(base * 0.5 <= s <= base * 1.5 for s in samples)
        assert len(set(samples)) > 1  # jitter spreads retries

    flat = t.with_options(retry_backoff=1, retry_delay=0.25)
    assert [retry_delay(flat.opts, n) for n in (1, 2, 3)] == [0.25, 0.25, 0.25]


def test_should_retry_decisions() -> None:
    t = keel.task(retries=2, retry_on=(KeyError, ConnectionError))(lambda: None)
    key = failure(KeyError("k"), 0.0)
    assert should_retry(t.opts, 1, key)
    assert should_retry(t.opts, 2, key)
    assert not should_retry(t.opts, 3, key)  # retries used up
    assert not should_retry(t.opts, 1, failure(ValueError("v"), 0.0))
    assert should_retry(t.opts, 1, failure(FlakyNetworkError("x"), 0.0))  # a subclass
    # Retryable keel errors are retried whatever retry_on says; others never are.
    assert should_retry(t.opts, 1, failure(keel.StepTimeoutError("slow"), 0.0))
    assert not should_retry(t.opts, 1, failure(keel.ParameterError("bad"), 0.0))
    no_retries = t.with_options(retries=0)
    assert not should_retry(no_retries.opts, 1, key)


# -- retry_on --------------------------------------------------------------------------------


def test_retry_on_retries_matching_errors(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "lookup", kind="key")
    assert run.result() == "key ok on 3"
    assert _lines(out) == ["key 1", "key 2", "key 3"]
    assert [a.error_type for a in run.steps[0].attempts] == ["KeyError", "KeyError", None]


def test_retry_on_does_not_retry_other_errors(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "lookup", kind="value")
    assert run.status == "FAILED"
    assert _lines(out) == ["value 1"]
    (attempt,) = run.steps[0].attempts
    assert attempt.error_type == "ValueError"
    assert run.error_type == "ValueError"


def test_retry_on_matches_subclasses_of_custom_errors(
    backend: str, executor: str, tmp_path: Path
) -> None:
    run, out = _run(tmp_path, "network")
    assert run.result() == 3
    assert _lines(out) == ["1", "2", "3"]
    first = run.steps[0].attempts[0]
    assert first.error_type is not None and first.error_type.endswith("FlakyNetworkError")
    assert "connection reset on attempt 1" in (first.error_message or "")


# -- timeouts --------------------------------------------------------------------------------


def test_timeout_fails_the_attempt(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "sleepy", arg=60)
    assert run.status == "FAILED"
    step = run.steps[0]
    assert step.status == "FAILED"
    (attempt,) = step.attempts
    assert attempt.status == "FAILED"
    assert attempt.error_type == "keel.errors.StepTimeoutError"
    assert run.error_type == "keel.errors.StepTimeoutError"
    assert "timeout" in (run.error_message or "")
    assert _lines(out) == ["start 1"]  # the attempt never got to its end


def test_fast_step_is_not_timed_out(backend: str, executor: str, tmp_path: Path) -> None:
    run, out = _run(tmp_path, "sleepy", arg=0)
    assert run.result() == "woke"
    assert _lines(out) == ["start 1", "end"]


def test_timeout_then_success_on_a_later_attempt(
    backend: str, executor: str, tmp_path: Path
) -> None:
    # retry_on=KeyError does not cover timeouts, but timeouts are retryable by nature.
    run, out = _run(tmp_path, "slow_first")
    assert run.status == "SUCCEEDED"
    assert run.result() == 2
    assert _lines(out) == ["start 1", "start 2"]
    first, second = run.steps[0].attempts
    assert (first.status, first.error_type) == ("FAILED", "keel.errors.StepTimeoutError")
    assert (second.status, second.error_type) == ("SUCCEEDED", None)


def test_process_timeout_excludes_worker_start_up(backend: str) -> None:
    """A fresh worker first starts and imports the task's module (slowly, here); the
    timeout bounds the attempt itself."""
    from flows.slow_import_flow import IMPORT_SECONDS, quick, slow_import_wf

    assert quick.opts.timeout is not None and quick.opts.timeout < IMPORT_SECONDS
    handle = keel.run(slow_import_wf)
    run = keel.Client().run(handle.id)
    assert [a.error_type for a in run.steps[0].attempts] == [None]
    assert handle.result() == "done"


@keel.task(name="retry_stuck", timeout=0.2)
def stuck(i: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return i


@keel.task(name="retry_quick")
def quick(i: int) -> int:
    return i


@keel.workflow(name="retry_many_timeouts", max_concurrency=2)
def many_timeouts(n: int) -> list[int]:
    stuck_ones = stuck.map(range(n))
    keel.wait(stuck_ones)
    return keel.gather(quick.map(range(n)))


def test_many_timeouts_leave_the_executor_usable(backend: str, executor: str) -> None:
    """Every timed-out attempt frees its slot: later steps of the run still all run."""
    run = keel.Client().run(keel.run(many_timeouts, n=6).id)
    # The stuck steps failed unobserved, so the run fails; what matters is that it ended
    # and the quick steps all ran after them.
    assert run.status == "FAILED"
    statuses = [(s.task, s.status) for s in run.steps]
    assert statuses == [("retry_stuck", "FAILED")] * 6 + [("retry_quick", "SUCCEEDED")] * 6
    assert all(s.attempts[0].error_type == "keel.errors.StepTimeoutError" for s in run.steps[:6])
