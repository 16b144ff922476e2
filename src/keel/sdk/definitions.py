"""`@keel.task` and `@keel.workflow`: definitions that stay plain callables.

Outside a run a task is just its function (so it is unit-testable); inside a
workflow body, calling it records a durable step through the engine.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from keel.errors import DefinitionError
from keel.sdk.context import current_runtime
from keel.sdk.futures import StepFuture

if TYPE_CHECKING:
    from keel.sdk.schedule import Schedule

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Resources:
    """What one attempt of a step needs. Recorded; honoured by executors that place work."""

    cpus: float | None = None
    gpus: float | None = None
    memory: int | None = None  # bytes
    custom: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    name: str
    retries: int = 0
    retry_delay: float = 1.0
    retry_backoff: float = 2.0
    retry_max_delay: float = 300.0
    retry_jitter: float = 0.1
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: float | None = None
    cache: bool = False
    cache_version: str | None = None
    executor: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    max_concurrency: int | None = None
    executor_options: Mapping[str, Any] = field(default_factory=dict)
    # Send the step to `keel worker` processes serving this queue (any host).
    queue: str | None = None
    pool: str | None = None
    priority: int = 0


def _check_executor(executor: str | None, where: str) -> None:
    if executor is None:
        return
    from keel.executors import available_executors

    known = available_executors()
    if executor not in known:
        raise DefinitionError(
            f"{where}: unknown executor {executor!r}",
            hint=f"Use one of: {', '.join(known)} (or register yours first with "
            "keel.executors.register_executor)",
        )


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")


def check_queue_name(name: str | None, where: str) -> str | None:
    if name is not None and (
        not isinstance(name, str) or not name or len(name) > 100 or set(name) - _NAME_CHARS
    ):
        raise DefinitionError(
            f"{where}: bad queue or pool name {name!r}",
            hint="Use letters, digits and _ - . : (at most 100 characters)",
        )
    return name


def _source_hash(fn: Callable[..., Any]) -> str:
    """A hash of the function's source (its bytecode when the source is unavailable)."""
    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = code.co_code if code is not None else repr(fn).encode()
    return hashlib.sha256(text).hexdigest()[:16]


class Task(Generic[P, R]):
    """A unit of work. Call it, `.submit()` it, or `.map()` it inside a workflow."""

    def __init__(self, fn: Callable[P, R], options: TaskOptions) -> None:
        self.fn = fn
        self.opts = options
        self.name = options.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self._code_hash: str | None = None
        res = options.resources
        request = {"cpus": res.cpus, "gpus": res.gpus, "memory": res.memory, **res.custom}
        # What executors that place work (Ray) are asked for; unset entries are left out.
        self.resource_request: dict[str, float] = {
            k: v for k, v in request.items() if v is not None
        }
        # What every step call of this task tells its executor.
        self.call_options: dict[str, Any] = dict(options.executor_options)
        if options.queue:
            self.call_options.update(
                queue=options.queue, pool=options.pool, priority=options.priority
            )
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<keel.task {self.name}>"

    @property
    def code_hash(self) -> str:
        if self._code_hash is None:
            self._code_hash = _source_hash(self.fn)
        return self._code_hash

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        runtime = current_runtime()
        if runtime is None:
            return self._call_plain(args, kwargs)
        # A runtime may run a call that is waited for at once on this thread (the
        # ephemeral runs of keel/serving); the engine's makes every call a step.
        inline = getattr(runtime, "call_task", None)
        if inline is not None:
            return inline(self, args, kwargs)  # type: ignore[no-any-return]
        return runtime.submit_task(self, args, kwargs).result()  # type: ignore[no-any-return]

    def _call_plain(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        if self.is_async:
            import asyncio

            return asyncio.run(self.fn(*args, **kwargs))  # type: ignore[no-any-return, arg-type]
        return self.fn(*args, **kwargs)

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> StepFuture[R]:
        """Start the step and return a future at once. Outside a run, runs now."""
        runtime = current_runtime()
        if runtime is None:
            from keel.sdk.futures import completed_future

            return completed_future(lambda: self._call_plain(args, kwargs), self.name)
        return runtime.submit_task(self, args, kwargs)

    def map(self, items: Iterable[Any], **common: Any) -> list[StepFuture[R]]:
        """One step per item (passed as the first argument), with `common` as keywords."""
        runtime = current_runtime()
        if runtime is None:
            return [self.submit(item, **common) for item in items]  # type: ignore[arg-type]
        return runtime.map_task(self, items, common)

    def with_options(self, **changes: Any) -> Task[P, R]:
        """A copy of this task with some options changed (e.g. `retries=5`)."""
        opts = replace(self.opts, **changes)
        _check_executor(opts.executor, f"task {opts.name}")
        return Task(self.fn, opts)


class Workflow(Generic[P, R]):
    """A durable function. `keel.run(wf, **params)` runs it; inside another workflow,
    calling it starts a child run."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str,
        executor: str | None,
        max_concurrency: int | None,
        tags: Mapping[str, str],
        experiment: str | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> None:
        self.fn = fn
        self.name = name
        self.experiment = experiment
        self.queue = queue
        self.priority = priority
        self.executor = executor
        self.max_concurrency = max_concurrency
        self.tags = dict(tags)
        self.signature = inspect.signature(fn)
        self._validator: Any = None
        # Declared with @keel.workflow(schedule=...); registered by schedulers and workers.
        self.schedule: Schedule | None = None
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"<keel.workflow {self.name}>"

    @property
    def entrypoint(self) -> str:
        """Where to find this workflow again (for resume in another process)."""
        module = sys.modules.get(self.fn.__module__)
        qualname = self.fn.__qualname__
        path = getattr(module, "__keel_path__", None) or getattr(module, "__file__", None)
        if self.fn.__module__ == "__main__" or getattr(module, "__keel_path__", None):
            return f"{Path(path).resolve()}:{qualname}" if path else f"__main__:{qualname}"
        return f"{self.fn.__module__}:{qualname}"

    @property
    def validator(self) -> Any:
        """The parameter checker (keel.sdk.params.ParamValidator), built on first use."""
        if self._validator is None:
            from keel.sdk.params import ParamValidator

            self._validator = ParamValidator(self.name, self.fn, self.signature)
        return self._validator

    def validate(self, params: Mapping[str, Any], *, require_json: bool = True) -> dict[str, Any]:
        """Check and convert parameters against the signature (see keel.sdk.params)."""
        return self.validator.validate(params, require_json)  # type: ignore[no-any-return]

    def params_json(self, params: Mapping[str, Any]) -> str:
        return self.validator.to_json_lenient(params)  # type: ignore[no-any-return]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        runtime = current_runtime()
        if runtime is None:
            return self.fn(*args, **kwargs)
        return runtime.submit_workflow(self, args, kwargs).result()  # type: ignore[no-any-return]

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> StepFuture[R]:
        """Inside a workflow: start this workflow as a child run and return a future."""
        runtime = current_runtime()
        if runtime is None:
            raise DefinitionError(
                f"workflow {self.name}.submit() was called outside a workflow",
                hint="Use keel.run(wf, **params) to start a run",
            )
        return runtime.submit_workflow(self, args, kwargs)


_workflows: dict[str, Workflow[Any, Any]] = {}


def registered_workflows() -> dict[str, Workflow[Any, Any]]:
    return dict(_workflows)


@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(
    *,
    name: str | None = None,
    retries: int = 0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_max_delay: float = 300.0,
    retry_jitter: float = 0.1,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    timeout: float | None = None,
    cache: bool = False,
    cache_version: str | None = None,
    executor: str | None = None,
    tags: Mapping[str, str] | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    max_concurrency: int | None = None,
    executor_options: Mapping[str, Any] | None = None,
    queue: str | None = None,
    pool: str | None = None,
    priority: int = 0,
) -> Callable[[Callable[P, R]], Task[P, R]]: ...


def task(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    retries: int = 0,
    retry_delay: float = 1.0,
    retry_backoff: float = 2.0,
    retry_max_delay: float = 300.0,
    retry_jitter: float = 0.1,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
    timeout: float | None = None,
    cache: bool = False,
    cache_version: str | None = None,
    executor: str | None = None,
    tags: Mapping[str, str] | None = None,
    resources: Resources | Mapping[str, Any] | None = None,
    max_concurrency: int | None = None,
    executor_options: Mapping[str, Any] | None = None,
    queue: str | None = None,
    pool: str | None = None,
    priority: int = 0,
) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
    """Mark a function as a task.

    retries / retry_delay / retry_backoff / retry_max_delay / retry_jitter: attempt n+1
    starts `min(retry_max_delay, retry_delay * retry_backoff**(n-1))` seconds after
    attempt n failed, spread by ±`retry_jitter` (a fraction). Only exceptions that are
    instances of `retry_on` are retried. `timeout` (seconds) bounds each attempt.
    `cache=True` reuses an earlier output with the same task name, source code,
    `cache_version` and inputs. `resources`: cpus, gpus, memory (bytes), custom.
    `executor_options` go to the executor as they are (e.g. `{"runtime_env": ...}` for Ray).
    `queue` sends each step to the `keel worker` processes serving that queue; `pool`
    caps how many steps of the pool run at once across all workers; `priority`
    orders steps within a queue (higher first).
    """

    def make(f: Callable[P, R]) -> Task[P, R]:
        task_name = name or f.__qualname__
        where = f"task {task_name}"
        if retries < 0:
            raise DefinitionError(f"{where}: retries must be >= 0, got {retries}")
        if retry_delay < 0 or retry_backoff < 1 or not 0 <= retry_jitter <= 1:
            raise DefinitionError(
                f"{where}: bad retry timing (retry_delay={retry_delay}, "
                f"retry_backoff={retry_backoff}, retry_jitter={retry_jitter})",
                hint="retry_delay >= 0, retry_backoff >= 1, 0 <= retry_jitter <= 1",
            )
        if timeout is not None and timeout <= 0:
            raise DefinitionError(f"{where}: timeout must be a positive number of seconds")
        if max_concurrency is not None and max_concurrency < 1:
            raise DefinitionError(f"{where}: max_concurrency must be >= 1")
        _check_executor(executor, where)
        on = retry_on if isinstance(retry_on, tuple) else (retry_on,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in on):
            raise DefinitionError(f"{where}: retry_on must be exception types, got {retry_on!r}")
        if isinstance(resources, Resources):
            res = resources
        else:
            raw = dict(resources or {})
            try:
                res = Resources(
                    cpus=raw.pop("cpus", None),
                    gpus=raw.pop("gpus", None),
                    memory=raw.pop("memory", None),
                    custom=raw,
                )
            except TypeError as exc:
                raise DefinitionError(f"{where}: bad resources {resources!r}: {exc}") from None
        opts = TaskOptions(
            name=task_name,
            retries=retries,
            retry_delay=retry_delay,
            retry_backoff=retry_backoff,
            retry_max_delay=retry_max_delay,
            retry_jitter=retry_jitter,
            retry_on=on,
            timeout=timeout,
            cache=cache,
            cache_version=cache_version,
            executor=executor,
            tags=dict(tags or {}),
            resources=res,
            max_concurrency=max_concurrency,
            executor_options=dict(executor_options or {}),
            queue=check_queue_name(queue, where),
            pool=check_queue_name(pool, where),
            priority=priority,
        )
        return Task(f, opts)

    return make(fn) if fn is not None else make


@overload
def workflow(fn: Callable[P, R], /) -> Workflow[P, R]: ...


@overload
def workflow(
    *,
    name: str | None = None,
    executor: str | None = None,
    max_concurrency: int | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str | None = None,
    queue: str = "default",
    priority: int = 0,
    schedule: str | Schedule | None = None,
    params: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    catchup: str | None = None,
    overlap: str | None = None,
    max_active_runs: int | None = None,
) -> Callable[[Callable[P, R]], Workflow[P, R]]: ...


def workflow(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    executor: str | None = None,
    max_concurrency: int | None = None,
    tags: Mapping[str, str] | None = None,
    experiment: str | None = None,
    queue: str = "default",
    priority: int = 0,
    schedule: str | Schedule | None = None,
    params: Mapping[str, Any] | None = None,
    timezone: str | None = None,
    catchup: str | None = None,
    overlap: str | None = None,
    max_active_runs: int | None = None,
) -> Workflow[P, R] | Callable[[Callable[P, R]], Workflow[P, R]]:
    """Mark a function as a workflow. Its parameters (with their type hints) are the
    run's parameters, validated when a run starts. `max_concurrency` caps how many of
    its steps run at once (default: the executor's). Each run is tracked in the
    experiment `experiment` (default: the workflow's name). `queue` and `priority`
    place runs submitted for workers (`keel run --submit`, `keel.submit`).

    `schedule` (a cron expression, or a `keel.Schedule`) runs it by itself, with
    `params`, `timezone`, `catchup`, `overlap` and `max_active_runs` as in
    `keel.Schedule` (see docs/scheduling.md)."""

    def make(f: Callable[P, R]) -> Workflow[P, R]:
        wf_name = name or f.__name__
        if inspect.iscoroutinefunction(f):
            raise DefinitionError(
                f"workflow {wf_name} is an async function",
                hint="Make the workflow body a plain def; its tasks may be async",
            )
        _check_executor(executor, f"workflow {wf_name}")
        if max_concurrency is not None and max_concurrency < 1:
            raise DefinitionError(f"workflow {wf_name}: max_concurrency must be >= 1")
        wf = Workflow(
            f,
            name=wf_name,
            executor=executor,
            max_concurrency=max_concurrency,
            tags=tags or {},
            experiment=experiment,
            queue=check_queue_name(queue, f"workflow {wf_name}") or "default",
            priority=priority,
        )
        if schedule is not None or params or timezone or catchup or overlap or max_active_runs:
            from keel.sdk.schedule import declare

            wf.schedule = declare(
                wf_name,
                schedule,
                params=params,
                timezone=timezone,
                catchup=catchup,
                overlap=overlap,
                max_active_runs=max_active_runs,
            )
        _workflows[wf_name] = wf
        return wf

    return make(fn) if fn is not None else make
