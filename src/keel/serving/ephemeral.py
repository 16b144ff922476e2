"""Run a workflow in memory: its steps are plain calls, nothing is recorded.

`EphemeralRuntime` implements the SDK's `WorkflowRuntime` protocol without the
engine: `t.submit(x)` and `t.map(xs)` run the task on a thread pool and hand back
futures that hold the live value; a future passed to another task is waited for
before that task is queued, so pool threads never block on each other. `t(x)`, and
a future waited for before a pool thread took it, run on the waiting thread: a
sequential pipeline costs no thread hand-offs.
There is no store, no replay, no retry, no cache: this is for request-sized
inference pipelines (preprocess -> model -> postprocess) where the latency of a
durable record per step is not wanted. Durable waits and signals have no meaning
here and are refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor
from typing import Any

from keel.errors import DefinitionError
from keel.sdk.context import StepContext, set_runtime, set_step
from keel.sdk.definitions import Task, Workflow
from keel.sdk.futures import StepFuture

_ids = itertools.count(1)
_logger = logging.getLogger("keel.ephemeral")


def _futures_in(value: Any, out: list[StepFuture[Any]]) -> None:
    if isinstance(value, StepFuture):
        out.append(value)
    elif isinstance(value, list | tuple):
        for v in value:
            _futures_in(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _futures_in(v, out)


def _resolved(value: Any) -> Any:
    """`value` with every future in it replaced by its result (they are all done)."""
    if isinstance(value, StepFuture):
        return value.result()
    if isinstance(value, list | tuple):
        return type(value)(_resolved(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolved(v) for k, v in value.items()}
    return value


class _Job:
    """One step ready to run: by a pool thread, or by whoever waits for it first."""

    __slots__ = ("args", "claimed", "future", "kwargs", "runtime", "task")

    def __init__(
        self,
        runtime: EphemeralRuntime,
        task: Task[Any, Any],
        future: EphemeralFuture,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.runtime = runtime
        self.task = task
        self.future = future
        self.args = args
        self.kwargs = kwargs
        self.claimed = False

    def claim(self) -> bool:
        with self.runtime.lock:
            if self.claimed:
                return False
            self.claimed = True
            return True

    def run_if_unclaimed(self) -> None:
        if self.claim():
            self.runtime._run(self.task, self.future, self.args, self.kwargs)


class EphemeralFuture(StepFuture[Any]):
    """A step's future whose `result()` runs the step on the waiting thread when no
    pool thread has started it yet: `t(x)` in a body then costs no thread hand-off."""

    __slots__ = ("job",)

    def __init__(self, owner: EphemeralRuntime, seq: int, key: str) -> None:
        super().__init__(owner, seq, key)
        self.job: _Job | None = None

    def result(self, timeout: float | None = None) -> Any:
        job = self.job
        if job is not None and not self.done_flag and job.claim():
            job.runtime._run(job.task, self, job.args, job.kwargs)
        return super().result(timeout)


class EphemeralRuntime:
    """One in-memory run of a workflow body; see the module's docstring."""

    def __init__(self, pool: Executor, *, db_url: str = "", artifacts_url: str = "") -> None:
        self.run_id = f"ephemeral-{next(_ids)}"
        self.ephemeral = True  # tracking calls are refused (tracking/active.py)
        # The store a task's `keel.load_model` reads models from (nothing is written).
        self.db_url = db_url
        self.artifacts_url = artifacts_url
        self.lock = threading.Lock()
        self._pool = pool
        self._seq = itertools.count()

    # -- FutureOwner ----------------------------------------------------------------
    def load_value(self, future: StepFuture[Any]) -> Any:  # pragma: no cover - never stored
        raise AssertionError("ephemeral futures always hold their value")

    # -- WorkflowRuntime ------------------------------------------------------------
    def submit_task(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]:
        seq = next(self._seq)
        future = EphemeralFuture(self, seq, f"{task.name}-{seq}")
        deps: list[StepFuture[Any]] = []
        _futures_in(args, deps)
        _futures_in(kwargs, deps)
        pending = [d for d in deps if not d.done()]
        if not pending:
            self._queue(future, task, args, kwargs)
            return future
        remaining = [len(pending)]

        def ready(_: StepFuture[Any]) -> None:
            with self.lock:
                remaining[0] -= 1
                go = remaining[0] == 0
            if go:
                self._queue(future, task, args, kwargs)

        for dep in pending:
            dep.add_done_callback(ready)
        return future

    def _queue(
        self,
        future: EphemeralFuture,
        task: Task[Any, Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        job = _Job(self, task, future, args, kwargs)
        future.job = job
        self._pool.submit(job.run_if_unclaimed)

    def call_task(self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """`t(x)` in the body: run the step here (its inputs are waited for first)."""
        seq = next(self._seq)
        future = EphemeralFuture(self, seq, f"{task.name}-{seq}")
        self._run(task, future, args, kwargs)
        return future.result()

    def map_task(
        self, task: Task[Any, Any], items: Iterable[Any], common: Mapping[str, Any]
    ) -> list[StepFuture[Any]]:
        kwargs = dict(common)
        return [self.submit_task(task, (item,), kwargs) for item in items]

    def submit_workflow(
        self, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]:
        # A child workflow's body runs here, on the caller's thread, with this runtime.
        seq = next(self._seq)
        future: StepFuture[Any] = StepFuture(self, seq, f"{workflow.name}-{seq}")
        try:
            value = workflow.fn(*_resolved(args), **_resolved(kwargs))
        except Exception as exc:
            self._complete(future, error=exc)
        else:
            self._complete(future, value=value)
        return future

    def durable_sleep(self, seconds: float) -> None:
        raise DefinitionError(
            "keel.sleep is a durable wait; an ephemeral run records nothing to wait on",
            hint="Serve this workflow in recorded mode (without --ephemeral)",
        )

    def wait_for_signal(self, name: str, timeout: float | None) -> Any:
        raise DefinitionError(
            f"keel.wait_for_signal({name!r}) needs a recorded run; ephemeral runs have no id "
            "to signal",
            hint="Serve this workflow in recorded mode (without --ephemeral)",
        )

    # -- running a step -------------------------------------------------------------
    def _run(
        self,
        task: Task[Any, Any],
        future: StepFuture[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        step = StepContext(
            run_id=self.run_id,
            step_key=future.key,
            task=task.name,
            attempt=1,
            idempotency_key=None,
            logger=_logger,
            seq=future.seq,
            db_url=self.db_url or None,
            artifacts_url=self.artifacts_url or None,
            ephemeral=True,
        )
        previous = set_step(step)
        try:
            call_args = _resolved(args)
            call_kwargs = _resolved(kwargs)
            if task.is_async:
                value = asyncio.run(task.fn(*call_args, **call_kwargs))
            else:
                value = task.fn(*call_args, **call_kwargs)
        except BaseException as exc:  # even SystemExit: a future left pending hangs the request
            self._complete(future, error=exc)
        else:
            self._complete(future, value=value)
        finally:
            set_step(previous)

    def _complete(
        self, future: StepFuture[Any], *, value: Any = None, error: BaseException | None = None
    ) -> None:
        with self.lock:
            if error is not None:
                callbacks = future._complete_locked(error=error)
            else:
                callbacks = future._complete_locked(value=value)
        for callback in callbacks:
            callback(future)


def run_ephemeral(
    workflow: Workflow[Any, Any],
    params: Mapping[str, Any],
    pool: Executor,
    *,
    db_url: str = "",
    artifacts_url: str = "",
) -> Any:
    """Call the workflow's body with `params` (already validated) on this thread,
    its steps in memory on `pool`; returns its result or raises its error."""
    runtime = EphemeralRuntime(pool, db_url=db_url, artifacts_url=artifacts_url)
    previous = set_runtime(runtime)
    try:
        return workflow.fn(**params)
    finally:
        set_runtime(previous)
