"""The queue executor: steps go to the shared work queue in the metadata store, and
`keel worker` processes (on any host that reaches the database) run them.

A step is queued once per attempt (a coordinator that resumed after a crash
re-submits the same attempt and finds it queued, running, or done). The
coordinator polls for finished attempts; their outcomes travel back through the
queue row. A worker that dies loses its lease and the attempt is claimed again.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

from keel.errors import KeelError
from keel.executors.base import StepCall, StepOutcome, failure
from keel.store import queue
from keel.store.config import StoreConfig
from keel.store.metadata import open_store
from keel.store.retry import with_retry

_POLL_SECONDS = 0.05
_COLLECT_BATCH = 500  # keys per query, well under any database's bound-parameter limit

log = logging.getLogger("keel.executors.queue")


class QueueExecutor:
    name = "queue"
    in_process = False

    def __init__(self, max_workers: int) -> None:
        # Keyed by each attempt's unique queue key, never by row id: ids of collected
        # rows may be handed out again while an older outcome is still being matched.
        self._pending: dict[str, tuple[StepCall, Callable[[StepOutcome], None]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._store: Any = None

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        import cloudpickle

        started = time.time()
        call.keep_value = False
        store = self._store or open_store(
            StoreConfig.from_env(db_url=call.db_url, artifacts_url=call.artifacts_url)
        )
        self._store = store
        payload = bytes(cloudpickle.dumps(call))
        key = queue.step_key(call.run_id, call.seq, call.attempt)

        def put() -> None:
            # Queuing an attempt twice is a no-op, so a retry after a blip is safe.
            queue.enqueue(
                store,
                kind="step",
                run_id=call.run_id,
                seq=call.seq,
                attempt=call.attempt,
                queue=str(call.options.get("queue") or "default"),
                pool=call.options.get("pool"),
                priority=int(call.options.get("priority") or 0),
                payload=payload,
            )

        try:
            # An attempt a previous coordinator queued is found, not queued again: its
            # outcome (if a worker already reported it) is collected below.
            with_retry(put, what=f"queuing step {call.key}")
        except KeelError as exc:
            exc.run_id, exc.step_key = call.run_id, call.key
            exc.args = (exc._render(),)
            done(failure(exc, started, tb=""))
            return
        with self._lock:
            self._pending[key] = (call, done)
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, name="keel-queue", daemon=True)
                self._thread.start()

    def _poll(self) -> None:
        while not self._closed:
            with self._lock:
                keys = list(self._pending)
            for start in range(0, len(keys), _COLLECT_BATCH):
                try:
                    finished = queue.finished_outcomes(
                        self._store, keys[start : start + _COLLECT_BATCH]
                    )
                except Exception:  # the database blipped: ask again shortly
                    break
                for key, data in finished:
                    self._deliver(key, data)
            time.sleep(_POLL_SECONDS)

    def _deliver(self, key: str, data: bytes) -> None:
        with self._lock:
            entry = self._pending.pop(key, None)
        if entry is None:
            return
        call, done = entry
        try:
            outcome: StepOutcome = pickle.loads(data)
        except Exception as exc:
            outcome = failure(exc, time.time())
        try:
            done(outcome)
        except Exception:
            # A bug downstream must not stop this thread: every other step of every
            # run this coordinator follows would wait forever.
            log.exception("handling the outcome of step %s/%s failed", call.run_id, call.key)

    def cancel(self, run_id: str) -> None:
        """Attempts already queued stay queued; the engine ignores what they return."""

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
