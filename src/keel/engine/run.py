"""One run's state while its workflow body executes: step numbering, replay of
recorded steps, dependency tracking, concurrency limits, retries and recording.

The workflow body runs on one thread and calls in through the `WorkflowRuntime`
methods; step outcomes arrive from executor threads. All mutable state is guarded
by `self.lock`; nothing here re-reads the run from the store (per-step cost does
not grow with the size of the run).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from keel._timers import timers
from keel.engine import cache as caching
from keel.engine.retries import retry_delay, should_retry
from keel.engine.session import Session
from keel.errors import (
    Cancelled,
    ForeignFutureError,
    KeelError,
    NonDeterminismError,
    StepFailedError,
    Suspended,
    UpstreamFailedError,
    describe_error,
    qualified_name,
)
from keel.executors.base import StepCall, StepOutcome, ValueRef
from keel.sdk.definitions import Task, Workflow
from keel.sdk.futures import _PENDING, StepFuture
from keel.status import REUSABLE_STEP, StepStatus
from keel.store.values import StoredValue

_CONTAINERS = (list, tuple, dict)
_NO_VALUE: Any = object()


def stored_from_row(row: Any, prefix: str = "output") -> StoredValue | None:
    serializer = getattr(row, f"{prefix}_serializer")
    if serializer is None:
        return None
    inline = getattr(row, f"{prefix}_inline")
    ref = getattr(row, f"{prefix}_ref")
    digest = getattr(row, f"{prefix}_hash", None) or ref or ""
    size = getattr(row, f"{prefix}_size", None) or (len(inline) if inline is not None else 0)
    return StoredValue(serializer, digest, size, getattr(row, f"{prefix}_type") or "", inline, ref)


def _find_futures(value: Any, out: list[StepFuture[Any]]) -> None:
    kind = type(value)
    if kind is StepFuture:
        out.append(value)
    elif kind is list or kind is tuple:
        for v in value:
            if type(v) is StepFuture or type(v) in _CONTAINERS:
                _find_futures(v, out)
    elif kind is dict:
        for v in value.values():
            if type(v) is StepFuture or type(v) in _CONTAINERS:
                _find_futures(v, out)


def _substitute(value: Any, live: bool) -> Any:
    """Replace futures by their values (same process) or by references to them."""
    kind = type(value)
    if kind is StepFuture:
        if live and value.has_live_value():
            return value.result()
        return ValueRef(value.stored, value.handle)
    if kind is list or kind is tuple:
        return kind(_substitute(v, live) for v in value)
    if kind is dict:
        return {k: _substitute(v, live) for k, v in value.items()}
    return value


class StepState:
    __slots__ = (
        "admitted",
        "args",
        "attempt",
        "attempts_started",
        "cache_info",
        "cache_key",
        "cached_from",
        "child_run_id",
        "dependents",
        "deps",
        "ended_at",
        "finished",
        "first_attempt",
        "future",
        "kind",
        "kwargs",
        "pending",
        "started_at",
        "status",
        "task",
        "workflow",
    )

    def __init__(
        self,
        future: StepFuture[Any],
        task: Task[Any, Any] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deps: list[StepFuture[Any]],
        attempt: int,
    ) -> None:
        self.future = future
        self.task = task
        self.workflow: Workflow[Any, Any] | None = None
        self.kind = "task"
        self.args = args
        self.kwargs = kwargs
        self.deps = deps
        self.pending = 0
        self.admitted = False
        self.finished = False
        self.attempt = attempt
        # A resumed step starts at its recorded attempt count + 1; its retry budget
        # counts from here, so a resumed run gives a failed step its retries again.
        self.first_attempt = attempt
        self.attempts_started = attempt - 1  # what the record counts
        self.dependents: list[StepState] | None = None
        self.status = StepStatus.PENDING
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.cache_key: str | None = None
        self.cache_info: str | None = None
        self.cached_from: str | None = None
        self.child_run_id: str | None = None

    @property
    def name(self) -> str:
        if self.task is not None:
            return self.task.name
        assert self.workflow is not None
        return self.workflow.name


class RunState:
    """Implements `WorkflowRuntime` (for the body) and `FutureOwner` (for its futures)."""

    def __init__(
        self,
        session: Session,
        run_id: str,
        workflow: Workflow[Any, Any],
        recorded: Mapping[int, Any],
        *,
        max_concurrency: int,
        strict_replay: bool = True,
        reused_from: str | None = None,
    ) -> None:
        self.session = session
        self.run_id = run_id
        self.workflow = workflow
        self.lock = threading.Lock()
        self.recorded: dict[int, Any] = dict(recorded)
        self.strict_replay = strict_replay
        self.reused_from = reused_from
        self.max_concurrency = max_concurrency
        # The workflows from the root run down to this one (child runs extend it).
        self.chain: tuple[str, ...] = (workflow.name,)
        self._next_seq = 0
        self._running = 0
        self._running_by_task: dict[str, int] = {}
        self._ready: deque[StepState] = deque()
        self._parked: dict[str, deque[StepState]] = {}
        self._active: dict[int, StepState] = {}
        self._failures: list[StepFuture[Any]] = []
        self._tasks_seen: dict[str, dict[str, Any]] = {}
        self._upstream: dict[int, StepFuture[Any]] = {}  # skipped step -> the failure behind it
        self._idle = threading.Event()
        self._idle.set()
        self._recorder = session.recorder
        self._progress = session.progress
        self.artifacts_url = session.artifacts_url
        self._inline_limit = session.inline_limit
        self._live_log_interval = session.store.config.live_log_interval
        self.db_url = session.store.url
        session.runs.append(self)

    # -- FutureOwner --------------------------------------------------------------
    def load_value(self, future: StepFuture[Any]) -> Any:
        return future.stored.load(self.artifacts_url)

    # -- WorkflowRuntime --------------------------------------------------------------
    def submit_task(
        self, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]:
        future, row = self._position(task.name, "task")
        if future.done_flag:
            return future
        attempt = (row.attempts or 0) + 1 if row is not None else 1
        deps: list[StepFuture[Any]] = []
        if args:
            _find_futures(args, deps)
        if kwargs:
            _find_futures(kwargs, deps)
        step = StepState(future, task, args, kwargs, deps, attempt)
        if task.name not in self._tasks_seen:
            self._record_task(task)
        self._enqueue(step)
        return future

    def _record_task(self, task: Task[Any, Any]) -> None:
        """Keep the options each task ran with (resources, retries...) on the run's record."""
        opts = task.opts
        with self.lock:
            self._tasks_seen[task.name] = {
                "retries": opts.retries,
                "timeout": opts.timeout,
                "cache": opts.cache,
                "cache_version": opts.cache_version,
                "executor": opts.executor,
                "max_concurrency": opts.max_concurrency,
                "tags": dict(opts.tags),
                "resources": task.resource_request,
                "code_hash": task.code_hash,
            }
            snapshot = json.dumps(self._tasks_seen, sort_keys=True)
        self._recorder.run_update(self.run_id, {"tasks": snapshot})

    def map_task(
        self, task: Task[Any, Any], items: Iterable[Any], common: Mapping[str, Any]
    ) -> list[StepFuture[Any]]:
        kwargs = dict(common)
        return [self.submit_task(task, (item,), kwargs) for item in items]

    def submit_workflow(
        self, workflow: Workflow[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> StepFuture[Any]:
        from keel.engine.children import check_depth, start_child

        check_depth(self, workflow)
        future, row = self._position(workflow.name, "workflow")
        if future.done_flag:
            return future
        attempt = (row.attempts or 0) + 1 if row is not None else 1
        seq = future.seq
        deps: list[StepFuture[Any]] = []
        _find_futures((args, kwargs), deps)
        step = StepState(future, None, args, kwargs, deps, attempt)
        step.kind = "workflow"
        step.workflow = workflow
        step.child_run_id = f"{self.run_id}.{seq}"
        self._check_owners(step)
        with self.lock:
            self._active[seq] = step
            self._idle.clear()
            self._progress.total += 1
            self._progress.running += 1
        step.status = StepStatus.RUNNING
        step.started_at = time.time()
        self._recorder.step(self._step_row(step, None))
        start_child(self, step)
        return future

    # -- durable waits (engine/waits.py) ----------------------------------------------
    def durable_sleep(self, seconds: float) -> None:
        from keel.engine.waits import durable_sleep

        durable_sleep(self, seconds)

    def wait_for_signal(self, name: str, timeout: float | None) -> Any:
        from keel.engine.waits import wait_for_signal

        return wait_for_signal(self, name, timeout)

    def allocate_wait(self, name: str, kind: str) -> tuple[int, str, Any]:
        """A position for a timer or signal wait, and its record if replaying."""
        future, row = self._position(name, kind)
        return future.seq, future.key, row

    def record_wait(
        self,
        seq: int,
        key: str,
        name: str,
        kind: str,
        status: StepStatus,
        *,
        stored: StoredValue | None = None,
        error: BaseException | None = None,
    ) -> None:
        now = time.time()
        self._recorder.step(
            {
                "run_id": self.run_id,
                "seq": seq,
                "key": key,
                "task": name,
                "kind": kind,
                "status": str(status),
                "attempts": 1,
                "started_at": now,
                "ended_at": None if status is StepStatus.RUNNING else now,
                "deps": None,
                "output_serializer": stored.serializer if stored else None,
                "output_inline": stored.inline if stored else None,
                "output_ref": stored.ref if stored else None,
                "output_hash": stored.digest if stored else None,
                "output_type": stored.type_name if stored else None,
                "output_size": stored.size if stored else None,
                "cache_key": None,
                "cache_info": None,
                "cached_from": None,
                "child_run_id": None,
                "error_type": qualified_name(type(error)) if error is not None else None,
                "error_message": error.message if isinstance(error, KeelError) else None,
            }
        )

    # -- replay -----------------------------------------------------------------------
    def _position(self, name: str, kind: str) -> tuple[StepFuture[Any], Any]:
        """The next position in the body's call sequence, its future, and its record
        when replaying. A recorded success completes the future at once."""
        if self.session.cancelled:
            raise Cancelled(self.run_id)
        with self.lock:
            seq = self._next_seq
            self._next_seq += 1
        future: StepFuture[Any] = StepFuture(self, seq, f"{name}-{seq}")
        if not self.recorded:
            return future, None
        row = self._replayed(seq, future.key, kind, name)
        if row is not None and row.status in REUSABLE_STEP:
            self._replay(future, row)
        return future, row

    def _replayed(self, seq: int, key: str, kind: str, name: str) -> Any:
        row = self.recorded.pop(seq, None)
        if row is None:
            return None
        if row.task == name and row.kind == kind:
            return row
        if not self.strict_replay:
            # A retry with changed code: reuse nothing from here on.
            self.recorded.clear()
            return None
        raise NonDeterminismError(
            f"replay diverged at step position {seq}: the record has {row.kind} "
            f"{row.task!r} (step {row.key}) but the code now calls {kind} {name!r}",
            run_id=self.run_id,
            step_key=row.key,
            hint="Workflow code must make the same calls in the same order on replay; "
            "start a fresh run, or use `keel retry` to reuse what still matches",
        )

    def _replay(self, future: StepFuture[Any], row: Any) -> StepFuture[Any]:
        stored = stored_from_row(row)
        with self.lock:
            future._complete_locked(stored=stored)
            self._progress.total += 1
            self._progress.replayed += 1
        if self.reused_from is not None:
            # A retry: the new run records the reused step as its own.
            self._recorder.step(self._reused_row(row, future))
        return future

    def _reused_row(self, row: Any, future: StepFuture[Any]) -> dict[str, Any]:
        values = dict(row._mapping)
        values.update(
            run_id=self.run_id, key=future.key, cached_from=f"{self.reused_from}/{row.key}"
        )
        return values

    # -- scheduling -------------------------------------------------------------------
    def _check_owners(self, step: StepState) -> None:
        for dep in step.deps:
            if dep._owner is not self:
                raise ForeignFutureError(
                    f"step {step.future.key} was given the future of step {dep.key} "
                    f"from run {dep.run_id}",
                    run_id=self.run_id,
                    step_key=step.future.key,
                    hint="Futures belong to the run that made them; pass the value "
                    "(call .result() in that run) or make the step in this run",
                )

    def _enqueue(self, step: StepState) -> None:
        self._check_owners(step)
        failed_dep: StepFuture[Any] | None = None
        ready: list[StepState] = []
        with self.lock:
            self._active[step.future.seq] = step
            self._idle.clear()
            self._progress.total += 1
            pending = 0
            for dep in step.deps:
                if not dep.done_flag:
                    pending += 1
                    parent = self._active[dep.seq]
                    if parent.dependents is None:
                        parent.dependents = []
                    parent.dependents.append(step)
                elif dep.peek_error() is not None and failed_dep is None:
                    failed_dep = dep
            step.pending = pending
            if failed_dep is None and pending == 0:
                ready = self._admit_locked(step)
        if failed_dep is not None:
            self._dispatch(self._skip(step, failed_dep))
        elif ready:
            self._dispatch(ready)

    def _admit_locked(self, step: StepState) -> list[StepState]:
        """Start the step now if the limits allow, else queue it. Returns steps to start."""
        assert step.task is not None
        limit = step.task.opts.max_concurrency
        name = step.task.name
        if self._running >= self.max_concurrency:
            self._ready.append(step)
            return []
        if limit is not None and self._running_by_task.get(name, 0) >= limit:
            self._parked.setdefault(name, deque()).append(step)
            return []
        self._running += 1
        self._progress.running += 1
        step.admitted = True
        if limit is not None:
            self._running_by_task[name] = self._running_by_task.get(name, 0) + 1
        return [step]

    def _release_locked(self, step: StepState) -> list[StepState]:
        """A running step ended: let waiting steps take its place."""
        assert step.task is not None
        self._running -= 1
        name = step.task.name
        if step.task.opts.max_concurrency is not None:
            self._running_by_task[name] -= 1
            parked = self._parked.get(name)
            if parked:
                self._ready.appendleft(parked.popleft())
        started: list[StepState] = []
        while self._ready and self._running < self.max_concurrency:
            candidate = self._ready.popleft()
            started.extend(self._admit_locked(candidate))
        return started

    def _dispatch(self, steps: list[StepState]) -> None:
        # A worklist, not recursion: cache hits and skips finish synchronously and
        # may make more steps ready (long chains would otherwise overflow the stack).
        work = deque(steps)
        while work:
            step = work.popleft()
            if step.finished:
                continue
            if self.session.cancelled:
                work.extend(self._finish(step, StepStatus.FAILED, error=Cancelled(self.run_id)))
                continue
            try:
                work.extend(self._start(step))
            except Exception as exc:  # e.g. an executor that cannot be created
                work.extend(self._finish(step, StepStatus.FAILED, error=exc))

    def _start(self, step: StepState) -> list[StepState]:
        task = step.task
        assert task is not None
        opts = task.opts
        # A step bound for a queue goes to whichever worker serves it.
        executor = self.session.executor(
            "queue" if opts.queue else opts.executor, self.max_concurrency
        )
        if opts.cache and step.cache_key is None:
            hit = self._cache_lookup(step)
            if hit is not None:
                return hit
        step.status = StepStatus.RUNNING
        step.attempts_started = step.attempt
        now = time.time()
        if step.started_at is None:
            step.started_at = now
        self._recorder.step(self._step_row(step, None))
        live = executor.in_process
        call = StepCall(
            run_id=self.run_id,
            seq=step.future.seq,
            key=step.future.key,
            task=task.name,
            fn=task.fn,
            args=_substitute(step.args, live) if step.deps and step.args else step.args,
            kwargs=_substitute(step.kwargs, live) if step.deps and step.kwargs else step.kwargs,
            attempt=step.attempt,
            artifacts_url=self.artifacts_url,
            inline_limit=self._inline_limit,
            live_log_interval=self._live_log_interval,
            db_url=self.db_url,
            timeout=opts.timeout,
            is_async=task.is_async,
            keep_value=live,
            resources=task.resource_request,
            options=task.call_options,
        )
        attempt_started = now
        executor.submit(call, lambda outcome: self._on_outcome(step, outcome, attempt_started))
        return []

    def _cache_lookup(self, step: StepState) -> list[StepState] | None:
        assert step.task is not None
        try:
            parts = caching.cache_parts(step.task, step.args, step.kwargs)
        except Exception as exc:
            return self._finish(step, StepStatus.FAILED, error=exc)
        step.cache_key = caching.cache_key(parts)
        step.cache_info = json.dumps(parts, sort_keys=True)
        row = self.session.store.find_cached(step.cache_key)
        if row is None:
            return None
        stored = stored_from_row(row)
        step.cached_from = f"{row.run_id}/{row.key}"
        step.started_at = step.ended_at = time.time()
        return self._finish(step, StepStatus.CACHED, stored=stored)

    # -- outcomes -----------------------------------------------------------------------
    def _on_outcome(self, step: StepState, outcome: StepOutcome, attempt_started: float) -> None:
        if isinstance(outcome.error, Cancelled):
            self._dispatch(self._finish(step, StepStatus.FAILED, error=outcome.error))
            return
        if outcome.logs:
            self._recorder.logs(
                [
                    {
                        "run_id": self.run_id,
                        "seq": step.future.seq,
                        "attempt": step.attempt,
                        "stream": stream,
                        "text": text,
                        "created_at": outcome.ended_at,
                    }
                    for stream, text in outcome.logs
                ]
            )
        self._recorder.attempt(
            {
                "run_id": self.run_id,
                "seq": step.future.seq,
                "attempt": step.attempt,
                "status": StepStatus.SUCCEEDED if outcome.ok else StepStatus.FAILED,
                "started_at": outcome.started_at or attempt_started,
                "ended_at": outcome.ended_at,
                "error_type": outcome.error_type,
                "error_message": outcome.error_message,
                "traceback": outcome.traceback,
            }
        )
        if outcome.ok:
            stored = outcome.stored
            assert stored is not None
            if stored.ref is not None:
                self._recorder.artifact(
                    {
                        "hash": stored.ref,
                        "size": stored.size,
                        "serializer": stored.serializer,
                        "type_name": stored.type_name,
                        "uri": _artifact_uri(self.artifacts_url, stored.ref),
                        "run_id": self.run_id,
                        "seq": step.future.seq,
                        "created_at": outcome.ended_at,
                    }
                )
            step.future.handle = outcome.handle
            ready = self._finish(
                step,
                StepStatus.SUCCEEDED,
                stored=stored,
                value=outcome.value if outcome.has_value else _NO_VALUE,
            )
        else:
            assert step.task is not None
            tries = step.attempt - step.first_attempt + 1  # attempts made by this execution
            if not self.session.cancelled and should_retry(step.task.opts, tries, outcome):
                delay = retry_delay(step.task.opts, tries)
                # The row keeps counting attempts started: the retry's own start
                # records it, so a crash during the backoff leaves no gap in numbers.
                step.attempt += 1
                step.status = StepStatus.PENDING  # waiting out its backoff: cancellable
                timers.call_later(delay, lambda: self._dispatch([step]))
                return
            error = outcome.error
            if error is None:
                error = StepFailedError(
                    f"{outcome.error_type}: {outcome.error_message}",
                    run_id=self.run_id,
                    step_key=step.future.key,
                    error_type=outcome.error_type,
                )
            ready = self._finish(
                step,
                StepStatus.FAILED,
                error=error,
                error_type=outcome.error_type,
                error_message=outcome.error_message,
            )
        if ready:
            self._dispatch(ready)

    def _skip(self, step: StepState, failed: StepFuture[Any]) -> list[StepState]:
        return self._finish(step, StepStatus.SKIPPED, error=self._skip_error(step, failed))

    def _skip_error(self, step: StepState, failed: StepFuture[Any]) -> UpstreamFailedError:
        root = failed
        while root.seq in self._upstream:
            root = self._upstream[root.seq]
        cause = root.peek_error()
        error = UpstreamFailedError(
            f"skipped because step {root.key} failed"
            + (f": {type(cause).__name__}: {cause}" if cause is not None else ""),
            run_id=self.run_id,
            step_key=step.future.key,
        )
        error.root_error = cause  # for the run's traceback, if the body re-raises the skip
        self._upstream[step.future.seq] = root
        return error

    def _finish(
        self,
        step: StepState,
        status: StepStatus,
        *,
        stored: StoredValue | None = None,
        value: Any = _NO_VALUE,
        error: BaseException | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> list[StepState]:
        """Record the step's final state, complete its future, release dependents.

        Dependents of a failed step are skipped, those of a cancelled one cancelled,
        through a worklist: a chain of any length ends without deep recursion.
        Returns the steps that became ready to start.
        """
        ready, ending = self._finish_one(
            step,
            status,
            stored=stored,
            value=value,
            error=error,
            error_type=error_type,
            error_message=error_message,
        )
        work = deque((dependent, step.future, error) for dependent in ending)
        while work:
            dependent, cause, cause_error = work.popleft()
            if dependent.finished:
                continue
            if isinstance(cause_error, (Cancelled, Suspended)):
                next_error: BaseException = cause_error
                more, ending = self._finish_one(dependent, StepStatus.FAILED, error=next_error)
            else:
                next_error = self._skip_error(dependent, cause)
                more, ending = self._finish_one(dependent, StepStatus.SKIPPED, error=next_error)
            ready.extend(more)
            work.extend((d, dependent.future, next_error) for d in ending)
        return ready

    def _finish_one(
        self,
        step: StepState,
        status: StepStatus,
        *,
        stored: StoredValue | None = None,
        value: Any = _NO_VALUE,
        error: BaseException | None = None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> tuple[list[StepState], list[StepState]]:
        """Finish one step: (steps now ready, dependents that must end with it)."""
        if step.finished:
            return [], []
        # A cancelled step, or a child run that parked itself, never ran to an end.
        cancelled = isinstance(error, (Cancelled, Suspended))
        step.finished = True
        # Handed back by a stopping worker or parked: another process continues the
        # run, so the step stays open. Stopped by a cancellation: it is closed.
        stopped = isinstance(error, Cancelled) and not self.session.handing_back
        if stopped:
            step.status = StepStatus.CANCELLED
        else:
            step.status = StepStatus.PENDING if cancelled else status
        step.ended_at = None if cancelled and not stopped else time.time()
        was_running = step.started_at is not None
        if error is not None and error_type is None:
            error_type = qualified_name(type(error))
            error_message = describe_error(error)
        if not cancelled or was_running:
            self._recorder.step(self._step_row(step, stored, error_type, error_message))
        if status is StepStatus.SUCCEEDED and step.cache_key:
            self._recorder.cache(
                {
                    "cache_key": step.cache_key,
                    "task": step.name,
                    "run_id": self.run_id,
                    "seq": step.future.seq,
                    "created_at": step.ended_at,
                }
            )
        skipped: list[StepState] = []
        ready: list[StepState] = []
        progress = self._progress
        with self.lock:
            if step.admitted or step.kind == "workflow":
                progress.running -= 1
            if status is StepStatus.SUCCEEDED:
                progress.succeeded += 1
            elif status is StepStatus.CACHED:
                progress.cached += 1
            elif status is StepStatus.SKIPPED:
                progress.skipped += 1
            elif not cancelled:
                progress.failed += 1
            callbacks = step.future._complete_locked(
                value=_PENDING if value is _NO_VALUE else value, error=error, stored=stored
            )
            if error is not None and not cancelled:
                self._failures.append(step.future)

            del self._active[step.future.seq]
            if step.admitted:
                ready = self._release_locked(step)
            for dependent in step.dependents or ():
                if dependent.finished:
                    continue
                if error is not None:
                    skipped.append(dependent)
                else:
                    dependent.pending -= 1
                    if dependent.pending == 0:
                        ready.extend(self._admit_locked(dependent))
            step.dependents = None
            step.args = ()
            step.kwargs = {}
            if not self._active:
                self._idle.set()
        for callback in callbacks:
            callback(step.future)
        return ready, skipped

    def finish_child(
        self, step: StepState, stored: StoredValue | None, error: BaseException | None
    ) -> None:
        """Called by the child-run thread when the child workflow run ended."""
        if error is None:
            ready = self._finish(step, StepStatus.SUCCEEDED, stored=stored)
        else:
            ready = self._finish(step, StepStatus.FAILED, error=error)
        if ready:
            self._dispatch(ready)

    # -- rows ---------------------------------------------------------------------------
    def _step_row(
        self,
        step: StepState,
        stored: StoredValue | None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "seq": step.future.seq,
            "key": step.future.key,
            "task": step.name,
            "kind": step.kind,
            "status": str(step.status),
            "attempts": step.attempts_started,
            "started_at": step.started_at,
            "ended_at": step.ended_at,
            "deps": json.dumps([d.seq for d in step.deps]) if step.deps else None,
            "output_serializer": stored.serializer if stored else None,
            "output_inline": stored.inline if stored else None,
            "output_ref": stored.ref if stored else None,
            "output_hash": stored.digest if stored else None,
            "output_type": stored.type_name if stored else None,
            "output_size": stored.size if stored else None,
            "cache_key": step.cache_key,
            "cache_info": step.cache_info,
            "cached_from": step.cached_from,
            "child_run_id": step.child_run_id,
            "error_type": error_type,
            "error_message": error_message,
        }

    # -- end of the run -------------------------------------------------------------------
    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def unobserved_failure(self) -> StepFuture[Any] | None:
        """A failed step whose error the body never saw, directly or through a step it
        caused to be skipped: such a failure fails the run."""
        seen: set[int] = set()
        for future in self._failures:
            if future.was_observed():
                cause: StepFuture[Any] | None = future
                while cause is not None and cause.seq not in seen:
                    seen.add(cause.seq)
                    cause = self._upstream.get(cause.seq)
        for future in self._failures:
            if future.seq not in seen and future.seq not in self._upstream:
                return future
        return None

    def cancel_pending(self) -> None:
        """Cancellation: steps not started yet end now; the body wakes with Cancelled."""
        with self.lock:
            waiting = [
                s
                for s in self._active.values()
                if s.status is StepStatus.PENDING and s.kind == "task"
            ]
            self._ready.clear()
            self._parked.clear()
        for step in waiting:
            if not step.finished:  # finishing one may already have finished its dependents
                self._finish(step, StepStatus.FAILED, error=Cancelled(self.run_id))


def _artifact_uri(url: str, digest: str) -> str:
    from keel.store.artifacts import artifact_store

    return artifact_store(url).uri(digest)
