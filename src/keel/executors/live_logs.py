"""Live logs: what a running attempt prints reaches the store while it runs.

Every attempt's output goes to its StepLogBuffer (capture.py). Once an attempt has
run for its call's `live_log_interval` seconds (`KEEL_LIVE_LOG_INTERVAL` where the
run started: default 1, 0 turns this off), one thread per process records what it
printed so far, every that many seconds, through the store's recorder, so `keel logs
--follow`, the REST tail and the UI show a long step's output as it comes. What is
left when the attempt ends travels with its outcome, as the output of short attempts
always does: they never take this path.

Order is kept: a shipment and the end of its attempt are serialized by the buffer's
lock. In the coordinating process the engine records the rest through the same
recorder, after; elsewhere (a process-pool worker, `keel worker`, Ray) the shipped
rows are committed before the attempt reports back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from keel.executors.capture import StepLogBuffer

if TYPE_CHECKING:
    from keel.executors.base import StepCall
    from keel.store.recorder import Recorder

log = logging.getLogger("keel.live_logs")

IDLE_SECONDS = 1.0  # how often the thread looks for attempts when none runs
MIN_SECONDS = 0.05  # a tiny interval must not turn the thread into a busy loop

# The attempts running in this process, by id(buffer): (call, buffer, start). Plain
# dict operations are atomic under the GIL; this runs once per step, so no lock.
_active: dict[int, tuple[StepCall, StepLogBuffer, float]] = {}
_start_lock = threading.Lock()
_thread: threading.Thread | None = None


def follow(call: StepCall, buffer: StepLogBuffer) -> None:
    """Ship this attempt's output while it runs (unless turned off)."""
    if call.live_log_interval <= 0:
        return
    _active[id(buffer)] = (call, buffer, time.monotonic())
    if _thread is None:
        _start()


def _start() -> None:
    global _thread
    with _start_lock:
        if _thread is None:
            _thread = threading.Thread(target=_loop, name="keel-live-logs", daemon=True)
            _thread.start()


def end(call: StepCall, buffer: StepLogBuffer) -> list[tuple[str, str]]:
    """Stop shipping; the output not shipped yet, to travel with the outcome. For an
    attempt away from the coordinating process, its shipments are committed now, so
    they come before the rest, which the coordinator records."""
    _active.pop(id(buffer), None)
    with buffer.lock:
        buffer.ended = True
        rest = buffer.take_locked()
    if buffer.shipped and call.away:
        _recorder(call).flush()
    return rest


def _recorder(call: StepCall) -> Recorder:
    from keel.store.config import StoreConfig
    from keel.store.metadata import open_store
    from keel.store.recorder import recorder_for

    config = StoreConfig.from_env(db_url=call.db_url, artifacts_url=call.artifacts_url)
    return recorder_for(open_store(config))


def _ship(call: StepCall, buffer: StepLogBuffer) -> None:
    if buffer.ended or not buffer.chunks:
        return  # (checked again under the lock) no store to open for an ended attempt
    # Opened before taking the lock: the step's own prints wait on that lock.
    recorder = _recorder(call)
    with buffer.lock:
        if buffer.ended:
            return
        chunks = buffer.take_locked()
        if not chunks:
            return
        now = time.time()
        # Queued under the lock: the attempt cannot end (and its rest be recorded)
        # between taking these chunks and queuing them.
        recorder.logs(
            [
                {
                    "run_id": call.run_id,
                    "seq": call.seq,
                    "attempt": call.attempt,
                    "stream": stream,
                    "text": text,
                    "created_at": now,
                }
                for stream, text in chunks
            ]
        )
        buffer.shipped = True


def _loop() -> None:
    while True:
        running = list(_active.values())
        every = min((c.live_log_interval for c, _, _ in running), default=IDLE_SECONDS)
        time.sleep(max(MIN_SECONDS, every))
        now = time.monotonic()
        for call, buffer, since in running:
            if now - since < call.live_log_interval:
                continue
            try:
                _ship(call, buffer)
            except Exception:
                # The output stays in the buffer and goes with the outcome instead.
                log.warning("could not record live output of %s/%s", call.run_id, call.key)
