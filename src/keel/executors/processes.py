"""A local process pool for CPU-bound steps. Functions and values travel with
cloudpickle; each step's output is recorded by the process that computed it.

Children are started with `spawn`, so a script that starts runs must guard its
entry point with `if __name__ == "__main__":`, as with `multiprocessing`.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from keel.errors import KeelError, StepTimeoutError
from keel.executors.base import StepCall, StepOutcome, execute_step, failure


class WorkerDiedError(KeelError):
    """The process running the step died (killed, out of memory, segfault)."""

    retryable = True


def _on_alarm(signum: int, frame: Any) -> None:
    raise StepTimeoutError("the attempt exceeded its timeout", hint="Raise the task's timeout")


def _run_in_child(payload: bytes) -> bytes:
    import cloudpickle

    call: StepCall = pickle.loads(payload)
    call.keep_value = False
    if call.timeout:
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, call.timeout)
    try:
        outcome = execute_step(call)
    finally:
        if call.timeout:
            signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        return bytes(cloudpickle.dumps(outcome))
    except Exception:
        outcome.error = None  # the exception object itself cannot travel; its text does
        return bytes(cloudpickle.dumps(outcome))


class ProcessExecutor:
    name = "processes"

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max(1, max_workers)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.max_workers, mp_context=multiprocessing.get_context("spawn")
                )
            return self._pool

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        import cloudpickle

        started = time.time()
        try:
            payload = cloudpickle.dumps(call)
        except Exception as exc:
            from keel.errors import SerializationError

            done(
                failure(
                    SerializationError(
                        f"cannot send step {call.key} to a process: {exc}",
                        run_id=call.run_id,
                        step_key=call.key,
                        hint="Its function and inputs must be picklable; use the threads executor",
                    ),
                    started,
                )
            )
            return
        pool = self._get_pool()
        try:
            future = pool.submit(_run_in_child, payload)
        except BrokenProcessPool:
            self._reset(pool)
            future = self._get_pool().submit(_run_in_child, payload)

        def finished(f: Future[bytes]) -> None:
            try:
                outcome: StepOutcome = pickle.loads(f.result())
            except BrokenProcessPool:
                self._reset(pool)
                outcome = failure(
                    WorkerDiedError(
                        "the worker process died while running the step",
                        run_id=call.run_id,
                        step_key=call.key,
                        hint="Check memory use; the step is retried if it has retries left",
                    ),
                    started,
                    tb="",
                )
            except Exception as exc:
                outcome = failure(exc, started)
            done(outcome)

        future.add_done_callback(finished)

    def _reset(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        broken.shutdown(wait=False, cancel_futures=True)

    def cancel(self, run_id: str) -> None:
        """Queued attempts finish as usual; the engine ignores what a cancelled run returns."""

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)
