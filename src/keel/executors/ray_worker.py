"""What runs on a Ray worker: one step attempt, under its deadline, with its value
returned apart from its outcome (see `keel.executors.ray_executor`)."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import ray

from keel.errors import StepTimeoutError
from keel.executors.base import StepCall, StepOutcome, execute_step, failure

# Seconds a timed-out step gets to stop after SIGALRM before its worker is killed.
HARD_KILL_GRACE = 5.0
# Exit code of a worker killed at its hard deadline.
_KILLED_EXIT = 86


class Arg:
    """Stands, inside a step's arguments, for the i-th value Ray resolved for the task."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, ...]:
        return (Arg, (self.index,))


def _fill(value: Any, values: tuple[Any, ...]) -> Any:
    kind = type(value)
    if kind is Arg:
        return values[value.index]
    if kind is list or kind is tuple:
        return kind(_fill(v, values) for v in value)
    if kind is dict:
        return {k: _fill(v, values) for k, v in value.items()}
    return value


class _Expired(BaseException):
    """Raised in the worker's main thread by SIGALRM at a step's deadline."""


def timeout_error(call: StepCall, detail: str) -> StepTimeoutError:
    return StepTimeoutError(
        f"attempt {call.attempt} exceeded the timeout of {call.timeout} s{detail}",
        run_id=call.run_id,
        step_key=call.key,
        hint="Raise the task's timeout or make the step faster",
    )


def _execute_with_deadline(call: StepCall) -> StepOutcome:
    assert call.timeout is not None
    if threading.current_thread() is not threading.main_thread():
        return execute_step(call)  # signals reach only the main thread: no soft deadline

    def expire(signum: int, frame: Any) -> None:
        raise _Expired

    started = time.time()
    killer = threading.Timer(call.timeout + HARD_KILL_GRACE, os._exit, args=(_KILLED_EXIT,))
    killer.daemon = True
    previous = signal.signal(signal.SIGALRM, expire)
    try:
        killer.start()
        try:
            signal.setitimer(signal.ITIMER_REAL, call.timeout)
            outcome = execute_step(call)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        err = timeout_error(call, "; the step was stopped")
        outcome = failure(err, started, tb="")
    finally:
        killer.cancel()
        signal.signal(signal.SIGALRM, previous)
    return outcome


def _adopt_store(call: StepCall) -> None:
    """Point this worker's default store at the run's, for code in the step that opens
    it (`keel.Client()`, tracking): a worker's environment is the cluster's, not the
    coordinator's. A worker runs one task at a time."""
    os.environ["KEEL_ARTIFACTS"] = call.artifacts_url
    if call.db_url:
        os.environ["KEEL_DB_URL"] = call.db_url


def _run_step(call: StepCall, *values: Any) -> tuple[StepOutcome, Any]:
    """A step attempt on a Ray worker: the outcome (without the value), then the value."""
    _adopt_store(call)
    if values:
        call.args = _fill(call.args, values)
        call.kwargs = _fill(call.kwargs, values)
    call.keep_value = True
    outcome = execute_step(call) if call.timeout is None else _execute_with_deadline(call)
    value, outcome.value, outcome.has_value = outcome.value, None, False
    if outcome.error is not None:
        import cloudpickle

        try:
            cloudpickle.dumps(outcome.error)
        except Exception:
            outcome.error = None  # the exception object cannot travel; its text does
    return outcome, value


# Ray's own retries are off: keel's retry policy decides.
_BASE_OPTIONS: dict[str, Any] = {"num_returns": 2, "max_retries": 0, "retry_exceptions": False}
_remote_fn: Any = None


def remote_step(**opts: Any) -> Any:
    """The Ray remote function running `_run_step`, with the given task options."""
    global _remote_fn
    if _remote_fn is None:
        _remote_fn = ray.remote(_run_step)
    return _remote_fn.options(**_BASE_OPTIONS, **opts)


__all__ = ["HARD_KILL_GRACE", "Arg", "remote_step", "timeout_error"]
