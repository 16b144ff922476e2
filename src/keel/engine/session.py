"""What the runs started by one `keel.run` / `resume` / `retry` share: the store,
the recorder, the executors, cancellation and progress counters."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from keel.executors import create_executor, default_concurrency, default_executor
from keel.executors.base import Executor
from keel.store.metadata import MetadataStore

if TYPE_CHECKING:
    from keel.engine.run import RunState
    from keel.store.recorder import Recorder


@dataclass(slots=True)
class Progress:
    """Step counts of a root run and its children, for progress displays."""

    total: int = 0
    running: int = 0
    succeeded: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    replayed: int = 0

    @property
    def done(self) -> int:
        return self.succeeded + self.cached + self.failed + self.skipped + self.replayed


@dataclass
class Session:
    store: MetadataStore
    recorder: Recorder
    executor_name: str | None = None
    max_concurrency: int | None = None
    progress: Progress = field(default_factory=Progress)
    cancelled: bool = False
    handing_back: bool = False
    runs: list[RunState] = field(default_factory=list)
    _executors: dict[str, Executor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def artifacts_url(self) -> str:
        return self.store.config.artifacts_url

    @property
    def inline_limit(self) -> int:
        return self.store.config.inline_limit

    def executor(self, name: str | None, min_workers: int = 1) -> Executor:
        """The session's executor called `name` (created on first use, with at least
        `min_workers` workers so a run's concurrency limit can be reached)."""
        chosen = name or self.executor_name or default_executor()
        ex = self._executors.get(chosen)
        if ex is None:
            with self._lock:
                ex = self._executors.get(chosen)
                if ex is None:
                    workers = max(self.max_concurrency or default_concurrency(), min_workers)
                    ex = self._executors[chosen] = create_executor(chosen, workers)
        return ex

    @property
    def uses_queue(self) -> bool:
        """Whether steps of this session went to the shared work queue."""
        return "queue" in self._executors

    def hand_back(self) -> None:
        """A stopping worker gives its runs back: each parks itself at its next keel
        call (recorded steps kept) and is re-queued for another worker."""
        self.handing_back = True
        self.cancel()

    def cancel(self) -> None:
        """Stop starting steps in every run of this session; wake their bodies."""
        if self.cancelled:
            return
        self.cancelled = True
        for ex in list(self._executors.values()):
            for run in self.runs:
                ex.cancel(run.run_id)
        for run in list(self.runs):
            run.cancel_pending()

    def close(self) -> None:
        for ex in self._executors.values():
            ex.shutdown(wait=False)
        self._executors.clear()
