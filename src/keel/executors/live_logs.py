"""Live logs: what a running attempt prints reaches the store while it runs.

Every attempt's output goes to its StepLogBuffer (capture.py). Once an attempt has
run for `KEEL_LIVE_LOG_INTERVAL` seconds (default 1; 0 turns this off), one thread
per process records what it printed so far, every that many seconds, through the
store's recorder, so `keel logs --follow`, the REST tail and the UI show a long
step's output as it comes. What is left when the attempt ends travels with its
outcome, as the output of short attempts always does: they never take this path.

Order is kept: a shipment and the end of its attempt are serialized by the buffer's
lock. In the coordinating process the engine records the rest through the same
recorder, after; elsewhere (a process-pool worker, `keel worker`, Ray) the shipped
rows are committed before the attempt reports back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from keel.executors.capture import StepLogBuffer

if TYPE_CHECKING:
    from keel.store.recorder import Recorder

log = logging.getLogger("keel.live_logs")

DEFAULT_INTERVAL = 1.0
_ENV = "KEEL_LIVE_LOG_INTERVAL"


@dataclass(slots=True, eq=False)
class Attempt:
    run_id: str
    seq: int
    attempt: int
    db_url: str | None
    artifacts_url: str
    buffer: StepLogBuffer
    since: float
    shipped: bool = False
    ended: bool = False


_active: dict[int, Attempt] = {}
_lock = threading.Lock()
_thread: threading.Thread | None = None
_interval_cache: tuple[str | None, float] = ("", DEFAULT_INTERVAL)


def interval() -> float:
    """The live-log interval in seconds (0: off), re-read when the variable changes."""
    global _interval_cache
    raw = os.environ.get(_ENV)
    if raw != _interval_cache[0]:
        from keel.store.config import env_seconds

        _interval_cache = (raw, env_seconds(_ENV, DEFAULT_INTERVAL, high=3600))
    return _interval_cache[1]


def follow(
    run_id: str,
    seq: int,
    attempt: int,
    db_url: str | None,
    artifacts_url: str,
    buffer: StepLogBuffer,
) -> Attempt | None:
    """Start shipping this attempt's output while it runs (None when turned off)."""
    global _thread
    if interval() <= 0:
        return None
    entry = Attempt(run_id, seq, attempt, db_url, artifacts_url, buffer, time.monotonic())
    with _lock:
        _active[id(entry)] = entry
        if _thread is None:
            _thread = threading.Thread(target=_loop, name="keel-live-logs", daemon=True)
            _thread.start()
    return entry


def end(entry: Attempt | None, buffer: StepLogBuffer, *, away: bool) -> list[tuple[str, str]]:
    """Stop shipping; the output not shipped yet, to travel with the outcome. `away`:
    the attempt ran outside the coordinating process (its shipments are committed
    now, so they come before the rest, which the coordinator records)."""
    if entry is None:
        with buffer.lock:
            return buffer.take_locked()
    with _lock:
        _active.pop(id(entry), None)
    with buffer.lock:
        entry.ended = True
        rest = buffer.take_locked()
    if entry.shipped and away:
        _recorder(entry).flush()
    return rest


def _recorder(entry: Attempt) -> Recorder:
    from keel.store.config import StoreConfig
    from keel.store.metadata import open_store
    from keel.store.recorder import recorder_for

    config = StoreConfig.from_env(db_url=entry.db_url, artifacts_url=entry.artifacts_url)
    return recorder_for(open_store(config))


def _ship(entry: Attempt) -> None:
    # Opened before taking the lock: the step's own prints wait on that lock.
    recorder = _recorder(entry)
    with entry.buffer.lock:
        if entry.ended:
            return
        chunks = entry.buffer.take_locked()
        if not chunks:
            return
        now = time.time()
        # Queued under the lock: the attempt cannot end (and its rest be recorded)
        # between taking these chunks and queuing them.
        recorder.logs(
            [
                {
                    "run_id": entry.run_id,
                    "seq": entry.seq,
                    "attempt": entry.attempt,
                    "stream": stream,
                    "text": text,
                    "created_at": now,
                }
                for stream, text in chunks
            ]
        )
        entry.shipped = True


def _loop() -> None:
    while True:
        every = interval() or DEFAULT_INTERVAL
        time.sleep(every)
        due = time.monotonic() - every
        with _lock:
            running = [e for e in _active.values() if e.since <= due]
        for entry in running:
            try:
                _ship(entry)
            except Exception:
                # The output stays in the buffer and goes with the outcome instead.
                log.warning("could not record live output of %s/%s", entry.run_id, entry.seq)
