"""Group commit: one thread writes what the engine records, many events per transaction.

Events are queued in the order they happen and written in that order, so a step's
record never becomes durable before the records of the steps it consumed. A crash
loses at most the events not yet written; their steps simply run again on resume.
Rows are full snapshots, so several events for one step in a batch collapse to the
last one.

A row the database refuses (a value it cannot hold) never takes its batch down:
the batch is written again in halves until the refused rows are found; every
other row is recorded. Free text (logs, error messages) is then made to fit;
any other refused row is dropped and kept as a `Refusal` of its run, which the
engine turns into a failure of that step and run (store/batch_parts.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from keel.errors import StoreUnavailableError
from keel.store.batch_parts import Refusal, fitted, is_data_error, join, split
from keel.store.limits import clean_text
from keel.store.metadata import Batch, MetadataStore
from keel.store.retry import RETRY_SECONDS

log = logging.getLogger("keel.recorder")

_MAX_BATCH_EVENTS = 50_000
_CANCEL_POLL_SECONDS = 0.5


class Recorder:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._watched: dict[str, Callable[[], None]] = {}
        self._last_poll = 0.0
        self._wake = threading.Event()
        self.error: BaseException | None = None
        self._refused: dict[str, list[Refusal]] = {}
        self._refused_lock = threading.Lock()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name="keel-recorder", daemon=True
                    )
                    self._thread.start()

    # -- events (any thread) --------------------------------------------------
    def step(self, row: dict[str, Any]) -> None:
        self._queue.put(("step", row))
        if self._thread is None:
            self._ensure_thread()

    def attempt(self, row: dict[str, Any]) -> None:
        self._queue.put(("attempt", row))

    def logs(self, rows: list[dict[str, Any]]) -> None:
        self._queue.put(("logs", rows))
        if self._thread is None:  # live logs may be a worker process's first event
            self._ensure_thread()

    def artifact(self, row: dict[str, Any]) -> None:
        self._queue.put(("artifact", row))

    def cache(self, row: dict[str, Any]) -> None:
        self._queue.put(("cache", row))

    # Tracking rows are tuples (see keel.store.metadata.TRACKING_COLUMNS): cheap to
    # make in a training loop that logs a metric per batch.
    def metric(self, row: tuple[Any, ...]) -> None:
        self._queue.put(("metric", row))
        if self._thread is None:
            self._ensure_thread()

    def param(self, row: tuple[Any, ...]) -> None:
        self._queue.put(("param", row))
        self._ensure_thread()

    def tag(self, row: tuple[Any, ...]) -> None:
        self._queue.put(("tag", row))
        self._ensure_thread()

    def logged_artifact(self, row: tuple[Any, ...]) -> None:
        self._queue.put(("logged_artifact", row))
        self._ensure_thread()

    def run_insert(self, row: dict[str, Any]) -> None:
        self._queue.put(("run_new", row))
        self._ensure_thread()

    def run_update(self, run_id: str, values: dict[str, Any]) -> None:
        self._queue.put(("run", (run_id, values)))
        self._ensure_thread()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is written; raise if writing failed."""
        self._ensure_thread()
        done = threading.Event()
        self._queue.put(("barrier", done))
        self._wake.set()
        if not done.wait(timeout):
            raise StoreUnavailableError(
                "the metadata store did not accept writes in time",
                hint="Check the database; the run can be resumed once it is reachable",
            )
        if self.error is not None:
            # The error stays until a later write succeeds, so every caller that
            # flushes meanwhile (the engine, a search) learns that records were lost.
            raise StoreUnavailableError(
                f"recording to the metadata store failed: {self.error}",
                hint="Check the database and disk space; resume the run afterwards",
            )

    def take_refused(self, run_id: str, seq: int | None = None) -> list[Refusal]:
        """The rows of `run_id` (of step `seq`, if given) the database refused since
        the last call, in the order they were found. Flush first to see them all."""
        with self._refused_lock:
            found = self._refused.get(run_id, [])
            taken = [r for r in found if seq is None or r.seq == seq]
            kept = [r for r in found if not (seq is None or r.seq == seq)]
            if kept:
                self._refused[run_id] = kept
            else:
                self._refused.pop(run_id, None)
        return taken

    def raise_refused(self, run_id: str, seq: int) -> None:
        """Raise the first refusal of this step's rows, if any (a step in a worker)."""
        refused = self.take_refused(run_id, seq)
        if refused:
            raise refused[0].error()

    def watch_cancel(self, run_id: str, on_cancel: Callable[[], None]) -> None:
        self._watched[run_id] = on_cancel
        self._ensure_thread()

    def unwatch(self, run_id: str) -> None:
        self._watched.pop(run_id, None)

    # -- writer thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=_CANCEL_POLL_SECONDS)
            except queue.Empty:
                self._poll_cancel()
                continue
            batch = Batch()
            steps: dict[tuple[str, int], dict[str, Any]] = {}
            attempts: dict[tuple[str, int, int], dict[str, Any]] = {}
            latest: dict[tuple[str, int, str], tuple[Any, ...]] = {}
            barriers: list[threading.Event] = []
            if first[0] != "barrier":
                # Let the batch fill without waking for every event (one commit per
                # event would cost more than the steps themselves); a flush wakes us.
                self._wake.wait(self.store.config.flush_interval)
            self._wake.clear()
            event: tuple[str, Any] | None = first
            count = 0
            while event is not None:
                kind, payload = event
                if kind == "metric":
                    batch.metrics.append(payload)
                    mkey = (payload[0], payload[1], payload[2])
                    seen = latest.get(mkey)
                    if seen is None or (payload[5], payload[6]) >= (seen[5], seen[6]):
                        latest[mkey] = payload
                elif kind == "step":
                    steps[(payload["run_id"], payload["seq"])] = _errors_escaped(payload)
                elif kind == "attempt":
                    key = (payload["run_id"], payload["seq"], payload["attempt"])
                    attempts[key] = _errors_escaped(payload)
                elif kind == "logs":
                    for row in payload:
                        # PostgreSQL refuses NUL in text, SQLite keeps it: escape it on
                        # both, so a log reads the same from either (a cheap scan).
                        if "\x00" in row["text"]:
                            row["text"] = clean_text(row["text"])
                    batch.logs.extend(payload)
                elif kind == "artifact":
                    batch.artifacts.append(payload)
                elif kind == "cache":
                    batch.cache.append(payload)
                elif kind == "run":
                    run_id, values = payload
                    batch.run_updates.setdefault(run_id, {}).update(_errors_escaped(values))
                elif kind == "param":
                    batch.params.append(payload)
                elif kind == "tag":
                    batch.tags.append(payload)
                elif kind == "logged_artifact":
                    batch.logged_artifacts.append(payload)
                elif kind == "run_new":
                    batch.runs_new.append(payload)
                elif kind == "barrier":
                    barriers.append(payload)
                count += 1
                if count >= _MAX_BATCH_EVENTS:
                    break
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    event = None
            batch.steps = list(steps.values())
            batch.attempts = list(attempts.values())
            batch.latest_metrics = list(latest.values())
            if batch:
                self._write(batch)
            for barrier in barriers:
                barrier.set()
            if time.monotonic() - self._last_poll > _CANCEL_POLL_SECONDS:
                self._poll_cancel()

    def _write(self, batch: Batch) -> None:
        try:
            if self._commit(batch):
                self.error = None
            return
        except Exception as exc:
            if not is_data_error(exc, self.store.engine.dialect):
                self.error = exc
                log.exception("recording failed")
                return
            log.warning("the database refused a row (%s); finding it", _first_line(exc))
        if self._isolate(split(batch)):
            self.error = None

    def _commit(self, batch: Batch) -> bool:
        """Write one batch, waiting out a dropped connection or a locked database for
        up to RETRY_SECONDS. False: gave up (self.error says why). Other errors raise."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                self.store.write_batch(batch)
                return True
            except sa.exc.OperationalError as exc:
                if time.monotonic() > deadline:
                    self.error = exc
                    log.error("giving up writing to the metadata store: %s", exc)
                    return False
                log.warning("metadata store write failed, retrying: %s", exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _isolate(self, parts: list[tuple[str, Any]]) -> bool:
        """Write the parts in order, halving any group the database refuses, so only
        the refused rows are left out. Each group is written once: a committed half is
        never written again. False if the store became unreachable meanwhile."""
        pending: deque[list[tuple[str, Any]]] = deque([parts])
        while pending:
            group = pending.popleft()
            try:
                if not self._commit(join(group)):
                    return False
                continue
            except Exception as exc:
                if not is_data_error(exc, self.store.engine.dialect):
                    self.error = exc
                    log.exception("recording failed")
                    return False
                refusal = exc
            if len(group) > 1:
                middle = len(group) // 2
                pending.appendleft(group[middle:])
                pending.appendleft(group[:middle])
            else:
                written = self._write_fitted(group[0])
                if written is None:
                    return False
                if not written:
                    self._refuse(group[0], refusal)
        return True

    def _write_fitted(self, part: tuple[str, Any]) -> bool | None:
        """Free text keel recorded on its own is made to fit and written. True: written;
        False: refused; None: the store failed otherwise (self.error says how)."""
        fit = fitted(part)
        if fit is None:
            return False
        try:
            if not self._commit(join([fit])):
                return None
        except Exception as exc:
            if is_data_error(exc, self.store.engine.dialect):
                return False
            self.error = exc
            log.exception("recording failed")
            return None
        log.warning("recorded %s with its text made to fit", fit[0])
        return True

    def _refuse(self, part: tuple[str, Any], exc: BaseException) -> None:
        refusal = Refusal.of(part, _first_line(exc))
        log.error(
            "the database refused %s of run %s; it is not recorded: %s",
            refusal.what,
            refusal.run_id,
            refusal.reason,
        )
        with self._refused_lock:
            found = self._refused.setdefault(refusal.run_id, [])
            if refusal not in found:  # a metric's point and its latest value: one refusal
                found.append(refusal)

    def _poll_cancel(self) -> None:
        self._last_poll = time.monotonic()
        if not self._watched:
            return
        try:
            cancelled = self.store.cancel_requested(list(self._watched))
        except sa.exc.SQLAlchemyError:
            return
        for run_id in cancelled:
            callback = self._watched.pop(run_id, None)
            if callback is not None:
                callback()


_recorders: dict[int, Recorder] = {}
_lock = threading.Lock()


def _errors_escaped(row: dict[str, Any]) -> dict[str, Any]:
    """An error message or traceback with a NUL in it (an exception's text can hold
    anything) escaped, as on PostgreSQL, so both databases record the same text."""
    for name in ("error_message", "traceback"):
        text = row.get(name)
        if text and "\x00" in text:
            row = {**row, name: clean_text(text)}
    return row


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def recorder_for(store: MetadataStore) -> Recorder:
    """One recorder per store per process, so concurrent runs share group commits."""
    with _lock:
        rec = _recorders.get(id(store))
        if rec is None:
            rec = _recorders[id(store)] = Recorder(store)
        return rec


def flush_pending(store: MetadataStore) -> None:
    """Make what this process recorded to `store` visible to its own reads (a Client
    inside a step reading the steps its run just finished). Free when idle."""
    rec = _recorders.get(id(store))
    if rec is not None and rec._thread is not None:
        rec.flush()
