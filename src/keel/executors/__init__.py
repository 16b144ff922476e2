"""Where a step's code runs: threads (default), a process pool, or Ray."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from keel.errors import ConfigError

if TYPE_CHECKING:
    from keel.executors.base import Executor

ExecutorFactory = Callable[[int], "Executor"]


def _threads(max_workers: int) -> Executor:
    from keel.executors.threads import ThreadExecutor

    return ThreadExecutor(max_workers)


def _processes(max_workers: int) -> Executor:
    from keel.executors.processes import ProcessExecutor

    return ProcessExecutor(max_workers)


def _ray(max_workers: int) -> Executor:
    # Ray is an optional extra and slow to import: look for it without importing it.
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "the Ray executor needs Ray, which is not installed",
            hint="Install it with `pip install keel[ray]` (or `pip install 'ray>=2.40'`)",
        )
    from keel.executors.ray_executor import RayExecutor

    return RayExecutor(max_workers)


def _queue(max_workers: int) -> Executor:
    from keel.executors.queue import QueueExecutor

    return QueueExecutor(max_workers)


_factories: dict[str, ExecutorFactory] = {
    "threads": _threads,
    "processes": _processes,
    "queue": _queue,
    "ray": _ray,
}


def register_executor(name: str, factory: ExecutorFactory) -> None:
    """Make an executor available by name (`executor="name"` on tasks and workflows)."""
    _factories[name] = factory


def available_executors() -> list[str]:
    return sorted(_factories)


def create_executor(name: str, max_workers: int) -> Executor:
    try:
        factory = _factories[name]
    except KeyError:
        raise ConfigError(
            f"no executor named {name!r} is available",
            hint=f"Available: {', '.join(sorted(_factories))}",
        ) from None
    return factory(max_workers)


def default_executor() -> str:
    return os.environ.get("KEEL_EXECUTOR", "threads")


def default_concurrency() -> int:
    return min(32, (os.cpu_count() or 1) + 4)
