"""The default executor: a pool of threads in the coordinating process.

Live values pass between steps without serialization (each output is still
recorded). A timed-out attempt is reported at its deadline; its thread is asked
to stop (an asynchronous exception, delivered when it next runs Python code) and
a fresh thread takes its place so the pool keeps its size.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
from collections.abc import Callable

from keel._timers import timers
from keel.errors import StepTimeoutError
from keel.executors.base import StepCall, StepOutcome, execute_step, failure


class _Abandoned(BaseException):  # noqa: N818
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
        self.done(outcome)
        return True


class ThreadExecutor:
    name = "threads"

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max(1, max_workers)
        self._queue: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._cancelled: set[str] = set()
        self._closed = False

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        slot = _Slot(call, done)
        self._queue.put(slot)
        with self._lock:
            if self._idle > 0 or self._threads >= self.max_workers:
                self._idle -= 1 if self._idle > 0 else 0
                return
            self._threads += 1
        threading.Thread(target=self._work, name="keel-step", daemon=True).start()

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
            with self._lock:
                self._idle += 1

    def _run(self, slot: _Slot) -> bool:
        call = slot.call
        slot.thread_id = threading.get_ident()
        if call.timeout is not None:
            timers.call_later(call.timeout, lambda: self._expire(slot))
        try:
            outcome = execute_step(call)
        except _Abandoned:
            return True
        if not slot.finish(outcome):
            return True  # timed out while finishing: the replacement already exists
        return False

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
