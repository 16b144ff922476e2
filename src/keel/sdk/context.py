"""Which run and step the current thread is working for.

The workflow body's thread carries a `WorkflowRuntime` (the engine's run state);
a thread executing a step carries a `StepContext`. Both are thread-local: steps run
on pool threads, other processes, or Ray workers, and each sets its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from keel.errors import KeelError

if TYPE_CHECKING:
    from keel.sdk.definitions import Task, Workflow
    from keel.sdk.futures import StepFuture


class WorkflowRuntime(Protocol):
    """What the engine offers to SDK calls made inside a workflow body.

    A runtime may also offer `call_task(task, args, kwargs)`, which `t(x)` then uses
    to run a call that is waited for at once on the caller's thread (the ephemeral
    runtime of keel/serving does; the engine records every call as a step instead).
    """

    run_id: str
    db_url: str
    artifacts_url: str

    def submit_task(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]: ...

    def map_task(
        self, task: Task[Any, Any], items: Iterable[Any], common: Mapping[str, Any]
    ) -> list[StepFuture[Any]]: ...

    def submit_workflow(
        self, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]: ...

    def durable_sleep(self, seconds: float) -> None: ...

    def wait_for_signal(self, name: str, timeout: float | None) -> Any: ...


@dataclass(frozen=True, slots=True)
class StepContext:
    """What `keel.context()` returns inside a step."""

    run_id: str
    step_key: str | None
    task: str | None
    attempt: int
    idempotency_key: str | None
    logger: logging.Logger
    seq: int | None = None  # the step's position in its run (None in a workflow body)
    # The store the run records to, so that code in the step (tracking) writes there too.
    db_url: str | None = None
    artifacts_url: str | None = None
    # True in an ephemeral (served, unrecorded) run: tracking calls are refused there.
    ephemeral: bool = False


class _Local(threading.local):
    runtime: WorkflowRuntime | None = None
    step: StepContext | None = None


_local = _Local()


def current_runtime() -> WorkflowRuntime | None:
    return _local.runtime


def set_runtime(runtime: WorkflowRuntime | None) -> WorkflowRuntime | None:
    previous = _local.runtime
    _local.runtime = runtime
    return previous


def set_step(step: StepContext | None) -> StepContext | None:
    previous = _local.step
    _local.step = step
    return previous


def current_step() -> StepContext | None:
    return _local.step


def context() -> StepContext:
    """The current step's run id, step key, attempt, idempotency key and logger.

    Inside a workflow body (outside any step) `step_key` is None. Outside any run
    this raises: there is nothing to describe.
    """
    if _local.step is not None:
        return _local.step
    runtime = _local.runtime
    if runtime is not None:
        return StepContext(
            run_id=runtime.run_id,
            step_key=None,
            task=None,
            attempt=0,
            idempotency_key=None,
            logger=logging.getLogger("keel.workflow"),
        )
    raise KeelError(
        "keel.context() was called outside any run",
        hint="Call it inside a @keel.task or @keel.workflow function started with keel.run",
    )
