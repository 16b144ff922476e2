"""The executor interface and the function that runs one attempt of a step.

An executor gets a `StepCall`, runs it somewhere by calling `execute_step`, and
hands the `StepOutcome` to the `done` callback (from any thread). It may run
`execute_step` in another process or machine: both types pickle with cloudpickle.
The engine owns retries, recording and scheduling; an executor only runs attempts.
"""

from __future__ import annotations

import os
import secrets
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from keel.errors import InvalidValueError, KeelError, describe_error, qualified_name
from keel.executors import capture, live_logs
from keel.sdk.context import StepContext, set_step
from keel.store.values import StoredValue, store_value

_NO_VALUE: Any = None


class ValueRef:
    """A recorded value passed to a step by reference; loaded where the step runs.

    `handle` is what the executor that produced the value returned for it (e.g. a
    Ray ObjectRef): an executor that understands it passes the value along without
    reading the recorded copy; any other reads `stored`.
    """

    __slots__ = ("handle", "stored")

    def __init__(self, stored: StoredValue, handle: Any = None) -> None:
        self.stored = stored
        self.handle = handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (ValueRef, (self.stored, self.handle))


_PROCESS_TOKEN = secrets.token_hex(6)
_process_name = (0, "")


def this_process() -> str:
    """Names this process, unlike any other on any host (the pid changes in a fork)."""
    global _process_name
    pid = os.getpid()
    if pid != _process_name[0]:
        _process_name = (pid, f"{pid}-{_PROCESS_TOKEN}")
    return _process_name[1]


@dataclass(slots=True)
class StepCall:
    run_id: str
    seq: int
    key: str
    task: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    attempt: int
    artifacts_url: str
    inline_limit: int
    db_url: str | None = None
    timeout: float | None = None
    is_async: bool = False
    keep_value: bool = True  # return the live value (same process) besides recording it
    # What the task asked for: cpus, gpus, memory (bytes) and custom resources.
    resources: Mapping[str, float] = field(default_factory=dict)
    # The task's `executor_options`, for the executor to interpret (e.g. Ray's runtime_env).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Seconds between recordings of a running attempt's output (0: at its end only).
    live_log_interval: float = 0.0
    # The process that made the call: the one coordinating the run.
    origin: str = field(default_factory=this_process)

    @property
    def away(self) -> bool:
        """True when the attempt runs outside the process coordinating its run: what it
        records must then be committed before its outcome is reported."""
        return self.origin != this_process()

    @property
    def idempotency_key(self) -> str:
        # Stable across attempts and re-executions after a crash, so an external
        # system can drop the duplicates that at-least-once execution may send.
        return f"{self.run_id}/{self.key}"


@dataclass(slots=True)
class StepOutcome:
    ok: bool
    started_at: float
    ended_at: float
    stored: StoredValue | None = None
    value: Any = _NO_VALUE
    has_value: bool = False
    error: BaseException | None = None
    error_type: str | None = None
    error_mro: tuple[str, ...] = ()
    error_message: str | None = None
    traceback: str | None = None
    retryable: bool | None = None  # None: decided by the task's retry_on
    logs: list[tuple[str, str]] = field(default_factory=list)
    handle: Any = None  # the executor's own reference to the value (see ValueRef)


class Executor(Protocol):
    """Runs step attempts. Implementations: threads, processes, ray."""

    name: str
    # True when steps run in this process: live values are passed and kept as they
    # are (no ValueRef), and outcomes carry the value itself.
    in_process: bool

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        """Start the attempt; call `done` exactly once with its outcome."""

    def cancel(self, run_id: str) -> None:
        """Best effort: drop attempts of the run that have not started."""

    def shutdown(self, wait: bool = True) -> None: ...


def failure(
    exc: BaseException,
    started: float,
    *,
    tb: str | None = None,
    logs: list[tuple[str, str]] | None = None,
) -> StepOutcome:
    cls = type(exc)
    return StepOutcome(
        ok=False,
        started_at=started,
        ended_at=time.time(),
        error=exc,
        error_type=qualified_name(cls),
        error_mro=tuple(qualified_name(c) for c in cls.__mro__),
        error_message=describe_error(exc),
        traceback=tb if tb is not None else "".join(traceback.format_exception(exc)),
        retryable=exc.retryable if isinstance(exc, KeelError) else None,
        logs=logs or [],
    )


def resolve_refs(value: Any, artifacts_url: str) -> Any:
    """`value` with every ValueRef (at any depth in lists, tuples, dicts) loaded."""
    kind = type(value)
    if kind is ValueRef:
        return value.stored.load(artifacts_url)
    if kind is list or kind is tuple:
        if any(type(v) is ValueRef or type(v) in (list, tuple, dict) for v in value):
            return kind(resolve_refs(v, artifacts_url) for v in value)
    elif kind is dict and any(
        type(v) is ValueRef or type(v) in (list, tuple, dict) for v in value.values()
    ):
        return {k: resolve_refs(v, artifacts_url) for k, v in value.items()}
    return value


# Called (with the call) after every attempt, where the attempt ran: tracking uses it
# to make what the step logged durable before the outcome is reported.
after_step_hooks: list[Callable[[StepCall], None]] = []


def execute_step(call: StepCall) -> StepOutcome:
    """Run one attempt here, capturing its output, and record its return value."""
    import logging

    capture.install()
    buffer = capture.StepLogBuffer()
    capture.set_buffer(buffer)
    previous = set_step(
        StepContext(
            run_id=call.run_id,
            step_key=call.key,
            task=call.task,
            attempt=call.attempt,
            idempotency_key=call.idempotency_key,
            logger=logging.getLogger(f"keel.step.{call.task}"),
            seq=call.seq,
            db_url=call.db_url,
            artifacts_url=call.artifacts_url,
        )
    )
    started = time.time()
    outcome: StepOutcome | None = None
    try:
        live_logs.follow(call, buffer)
        args = resolve_refs(call.args, call.artifacts_url) if call.args else ()
        kwargs = resolve_refs(call.kwargs, call.artifacts_url) if call.kwargs else {}
        if call.is_async:
            import asyncio

            value = asyncio.run(call.fn(*args, **kwargs))
        else:
            value = call.fn(*args, **kwargs)
        stored = store_value(
            value,
            artifacts_url=call.artifacts_url,
            inline_limit=call.inline_limit,
            describe=lambda: f"output of step {call.key}",
        )
        if call.keep_value:
            outcome = StepOutcome(True, started, time.time(), stored, value, True)
        else:
            outcome = StepOutcome(True, started, time.time(), stored)
    except Exception as exc:
        if isinstance(exc, KeelError) and exc.step_key is None:
            exc.step_key = call.key
            exc.run_id = call.run_id
            exc.args = (exc._render(),)
        outcome = failure(exc, started)
    finally:
        try:
            for hook in after_step_hooks:
                try:
                    hook(call)
                except InvalidValueError as exc:  # the store refused what the step logged
                    if exc.step_key is None:
                        exc.step_key = call.key
                        exc.args = (exc._render(),)
                    outcome = failure(exc, started)
        finally:
            set_step(previous)
            capture.set_buffer(None)
            rest = live_logs.end(call, buffer)
            if outcome is not None:
                outcome.logs = rest
    assert outcome is not None  # set by the try or the except above
    return outcome
