"""The queue executor: steps go to the shared work queue in the metadata store, and
`keel worker` processes (on any host that reaches the database) run them.

A step is queued once per attempt (a coordinator that resumed after a crash
re-submits the same attempt and finds it queued, running, or done). Attempts
submitted while the poll thread was busy are queued together, in one transaction. The
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
        # Submitted, not yet queued: the poll thread queues them together.
        self._submitted: list[tuple[StepCall, Callable[[StepOutcome], None]]] = []
        # Queued, keyed by each attempt's unique queue key, never by row id: ids of
        # collected rows may be handed out again while an older outcome is matched.
        self._pending: dict[str, tuple[StepCall, Callable[[StepOutcome], None]]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._store: Any = None

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        """Hand the attempt to the poll thread, which queues it with the others
        submitted meanwhile in one transaction (the caller does no database work)."""
        call.keep_value = False
        if self._store is None:
            self._store = open_store(
                StoreConfig.from_env(db_url=call.db_url, artifacts_url=call.artifacts_url)
            )
        with self._lock:
            self._submitted.append((call, done))
            if self._thread is None:
                self._thread = threading.Thread(target=self._poll, name="keel-queue", daemon=True)
                self._thread.start()
        self._wake.set()

    def _poll(self) -> None:
        while not self._closed:
            self._queue_submitted()
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
            self._wake.wait(_POLL_SECONDS)
            self._wake.clear()

    def _queue_submitted(self) -> None:
        import cloudpickle

        with self._lock:
            batch, self._submitted = self._submitted, []
        items: list[queue.StepItem] = []
        accepted: list[tuple[StepCall, Callable[[StepOutcome], None]]] = []
        known_pools: dict[str, int] | None = None
        for call, done in batch:
            started = time.time()
            pool = call.options.get("pool")
            try:
                if pool is not None:
                    if known_pools is None:
                        known_pools = with_retry(self._list_pools, what="reading the pools")
                    if pool not in known_pools:
                        queue.check_pool(self._store, pool)  # raises, naming the pools
                payload = bytes(cloudpickle.dumps(call))
            except Exception as exc:
                self._fail(call, done, exc, started)
                continue
            items.append(
                queue.StepItem(
                    run_id=call.run_id,
                    seq=call.seq,
                    attempt=call.attempt,
                    queue=str(call.options.get("queue") or "default"),
                    priority=int(call.options.get("priority") or 0),
                    pool=pool,
                    payload=payload,
                )
            )
            accepted.append((call, done))
        if not items:
            return
        try:
            # Queuing again after a blip is a no-op for what the first try queued.
            with_retry(
                lambda: queue.enqueue_steps(self._store, items),
                what=f"queuing {len(items)} step(s)",
            )
        except KeelError as exc:
            for call, done in accepted:
                self._fail(call, done, exc, time.time())
            return
        with self._lock:
            for call, done in accepted:
                self._pending[queue.step_key(call.run_id, call.seq, call.attempt)] = (call, done)

    def _list_pools(self) -> dict[str, int]:
        return queue.list_pools(self._store)

    def _fail(
        self,
        call: StepCall,
        done: Callable[[StepOutcome], None],
        exc: BaseException,
        started: float,
    ) -> None:
        if isinstance(exc, KeelError):
            exc.run_id, exc.step_key = call.run_id, call.key
            exc.args = (exc._render(),)
        self._call(call, done, failure(exc, started, tb=""))

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
        self._call(call, done, outcome)

    def _call(
        self, call: StepCall, done: Callable[[StepOutcome], None], outcome: StepOutcome
    ) -> None:
        try:
            done(outcome)
        except Exception:
            # A bug downstream must not stop this thread: every other step of every
            # run this coordinator follows would wait forever.
            log.exception("handling the outcome of step %s/%s failed", call.run_id, call.key)

    def cancel(self, run_id: str) -> None:
        """The run's attempts that no worker has claimed leave the queue and end as
        cancelled, as the thread pool's unstarted calls do (else a run whose steps
        wait for a worker that never comes could not stop). Claimed ones finish."""
        from keel.errors import Cancelled

        with self._lock:
            unsent = [(c, d) for c, d in self._submitted if c.run_id == run_id]
            self._submitted = [(c, d) for c, d in self._submitted if c.run_id != run_id]
            keys = [key for key, (call, _) in self._pending.items() if call.run_id == run_id]
        taken: list[str] = []
        if keys and self._store is not None:
            try:
                taken = queue.take_queued(self._store, keys)
            except Exception as exc:  # the database blipped: they stay queued
                log.warning(
                    "could not take the queued steps of run %s off the queue: %s", run_id, exc
                )
        with self._lock:
            cancelled = [self._pending.pop(key) for key in taken if key in self._pending]
        for call, done in unsent + cancelled:
            self._call(call, done, failure(Cancelled(run_id), time.time(), tb=""))

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
