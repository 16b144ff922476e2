"""The default executor: a pool of threads in the coordinating process.

Live values pass between steps without serialization (each output is still
recorded). A timed-out attempt is reported at its deadline; its thread is asked
to stop (an asynchronous exception, delivered when it next runs Python code) and
a fresh thread takes its place so the pool keeps its size.

The pool grows only when work waits while no step finishes: threads that run
short pure-Python steps just fight over the GIL, so a backlog of quick steps is
served by few threads, while steps that block (I/O, sleeps, native code that
releases the GIL) stall completions and make the pool grow up to its maximum.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable

from keel._timers import timers
from keel.errors import StepTimeoutError
from keel.executors.base import StepCall, StepOutcome, execute_step, failure


class _Abandoned(BaseException):
    """Raised inside a timed-out step's thread to unwind it; never shown to users."""


class _Slot:
    __slots__ = ("call", "done", "finished", "lock", "thread_id")

    def __init__(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        self.call = call
        self.done = done
        self.finished = False
        self.thread_id: int | None = None
        self.lock = threading.Lock()

    def finish(self, outcome: StepOutcome) -> bool:
        with self.lock:
            if self.finished:
                return False
            self.finished = True
        try:
            self.done(outcome)
        except Exception:
            # A failing callback must not take the pool's thread with it.
            logging.getLogger("keel.executors").exception(
                "handling the outcome of step %s failed", self.call.key
            )
        return True


# Grow the pool when queued work has seen no step finish for this long.
STALL_SECONDS = 0.02
# Threads started at once, before anything is known about the steps.
EAGER_THREADS = 2


class ThreadExecutor:
    name = "threads"
    in_process = True

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max(1, max_workers)
        self._queue: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._last_finish = time.monotonic()
        self._growth_check_pending = False
        self._cancelled: set[str] = set()
        self._closed = False

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        self._queue.put(_Slot(call, done))
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                return
            if self._threads >= self.max_workers:
                return
            if self._threads >= EAGER_THREADS:
                self._schedule_growth_check_locked()
                return
            self._threads += 1
        self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._work, name="keel-step", daemon=True).start()

    def _schedule_growth_check_locked(self) -> None:
        if not self._growth_check_pending:
            self._growth_check_pending = True
            timers.call_later(STALL_SECONDS, self._growth_check)

    def _growth_check(self) -> None:
        with self._lock:
            self._growth_check_pending = False
            if self._closed or self._queue.empty() or self._threads >= self.max_workers:
                return
            stalled = time.monotonic() - self._last_finish >= STALL_SECONDS
            if stalled:
                self._threads += 1
            self._schedule_growth_check_locked()
        if stalled:
            self._spawn()

    def _work(self) -> None:
        while True:
            slot = self._queue.get()
            if slot is None:
                return
            call = slot.call
            if call.run_id in self._cancelled:
                slot.finish(failure(_cancelled(call), time.time()))
            else:
                abandoned = self._run(slot)
                if abandoned:
                    return  # a replacement thread took this one's place
            self._last_finish = time.monotonic()
            with self._lock:
                self._idle += 1

    def _run(self, slot: _Slot) -> bool:
        """Run one attempt; True when the thread was abandoned (timed out) meanwhile."""
        call = slot.call
        slot.thread_id = threading.get_ident()
        if call.timeout is not None:
            timers.call_later(call.timeout, lambda: self._expire(slot))
        try:
            outcome = execute_step(call)
        except _Abandoned:
            return True
        # Finishing fails when the attempt timed out meanwhile: a replacement thread exists.
        return not slot.finish(outcome)

    def _expire(self, slot: _Slot) -> None:
        call = slot.call
        err = StepTimeoutError(
            f"attempt {call.attempt} exceeded the timeout of {call.timeout} s",
            run_id=call.run_id,
            step_key=call.key,
            hint="Raise the task's timeout or make the step faster",
        )
        if not slot.finish(failure(err, time.time() - (call.timeout or 0), tb="")):
            return
        if slot.thread_id is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(slot.thread_id), ctypes.py_object(_Abandoned)
            )
        with self._lock:
            if self._closed:
                return
        threading.Thread(target=self._work, name="keel-step", daemon=True).start()

    def cancel(self, run_id: str) -> None:
        self._cancelled.add(run_id)

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            count = self._threads
        for _ in range(count):
            self._queue.put(None)


def _cancelled(call: StepCall) -> BaseException:
    from keel.errors import Cancelled

    return Cancelled(call.run_id)
