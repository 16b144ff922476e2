"""A local process pool for CPU-bound steps. Functions and values travel with
cloudpickle; each step's output is recorded by the process that computed it.

Each worker process has its own pipe, so when a worker dies (killed, out of
memory, a crash in native code) exactly the step it was running fails with a
retryable `WorkerDiedError`, and the others carry on: unlike a
`concurrent.futures.ProcessPoolExecutor`, whose every pending task fails when one
worker dies. A timed-out attempt is stopped by killing its worker, which works
even inside native code.

Children are started with `spawn`, so a script that starts runs must guard its
entry point with `if __name__ == "__main__":`, as with `multiprocessing`.
"""

from __future__ import annotations

import atexit
import multiprocessing
import pickle
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from keel.errors import Cancelled, KeelError, SerializationError, StepTimeoutError
from keel.executors.base import StepCall, StepOutcome, execute_step, failure


class WorkerDiedError(KeelError):
    """The process running the step died (killed, out of memory, segfault)."""

    retryable = True


def _worker_main(conn: Connection) -> None:
    """A worker process: run attempts sent over `conn` until told to stop."""
    import cloudpickle

    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not payload:
            return
        call: StepCall = pickle.loads(payload)
        # Tell the dispatcher the attempt starts now: the timeout counts from here,
        # not from when the job was sent (a fresh worker first starts up and imports).
        conn.send_bytes(b"")
        call.keep_value = False
        outcome = execute_step(call)
        try:
            data = cloudpickle.dumps(outcome)
            if outcome.error is not None:
                # An exception can pickle yet fail to unpickle (an __init__ whose
                # arguments differ from `args`): check here, not in the parent.
                pickle.loads(data)
        except Exception:
            outcome.error = None  # the exception object cannot travel; its text does
            data = cloudpickle.dumps(outcome)
        conn.send_bytes(data)


@dataclass
class _Job:
    call: StepCall
    payload: bytes
    done: Callable[[StepOutcome], None]
    submitted: float


class _Worker:
    def __init__(self, ctx: Any) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        # Not a daemon: steps may start processes of their own (daemons cannot).
        # Workers are killed at exit by `_kill_all_workers` instead.
        self.process = ctx.Process(target=_worker_main, args=(child_conn,), daemon=False)
        self.process.start()
        child_conn.close()
        self.job: _Job | None = None
        self.running = False  # the worker acknowledged the job and started the attempt
        self.started = 0.0

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


_live_executors: weakref.WeakSet[ProcessExecutor] = weakref.WeakSet()


@atexit.register
def _kill_all_workers() -> None:
    # Runs before multiprocessing's own exit handler, which would wait for them.
    for executor in list(_live_executors):
        for worker in list(executor._workers):
            worker.kill()


class ProcessExecutor:
    name = "processes"
    in_process = False

    def __init__(self, max_workers: int) -> None:
        self.max_workers = max(1, max_workers)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._workers: list[_Worker] = []
        self._cancelled: set[str] = set()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._thread: threading.Thread | None = None
        self._closed = False
        _live_executors.add(self)

    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        import cloudpickle

        started = time.time()
        try:
            payload = cloudpickle.dumps(call)
        except Exception as exc:
            done(
                failure(
                    SerializationError(
                        f"cannot send step {call.key} to a worker process: {exc}",
                        run_id=call.run_id,
                        step_key=call.key,
                        hint="Its function and inputs must be picklable; "
                        "or run this task on the threads executor",
                    ),
                    started,
                    tb="",
                )
            )
            return
        with self._lock:
            self._queue.append(_Job(call, payload, done, started))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="keel-processes", daemon=True
                )
                self._thread.start()
        self._wake_w.send_bytes(b"1")

    # -- the dispatcher thread ------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    break
                self._assign_locked()
                busy = [w for w in self._workers if w.job is not None]
                sentinels = {w.process.sentinel: w for w in self._workers}
            deadline = min(
                (
                    w.started + w.job.call.timeout
                    for w in busy
                    if w.running and w.job and w.job.call.timeout
                ),
                default=None,
            )
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = wait([self._wake_r, *(w.conn for w in busy), *sentinels], timeout)
            # Results before deaths: a worker may send its result and then exit.
            for item in sorted(ready, key=lambda r: isinstance(r, int)):
                if item is self._wake_r:
                    self._drain_wake()
                elif isinstance(item, int):
                    self._worker_died(sentinels[item])
                else:
                    self._receive(next(w for w in busy if w.conn is item))
            self._expire(busy)
        for worker in self._workers:
            worker.kill()

    def _drain_wake(self) -> None:
        while self._wake_r.poll():
            self._wake_r.recv_bytes()

    def _assign_locked(self) -> None:
        while self._queue:
            idle = next((w for w in self._workers if w.job is None), None)
            if idle is None:
                if len(self._workers) >= self.max_workers:
                    return
                idle = _Worker(self._ctx)
                self._workers.append(idle)
            job = self._queue.popleft()
            if job.call.run_id in self._cancelled:
                job.done(failure(Cancelled(job.call.run_id), job.submitted, tb=""))
                continue
            idle.job = job
            idle.running = False
            idle.started = time.monotonic()
            idle.conn.send_bytes(job.payload)

    def _receive(self, worker: _Worker) -> None:
        job = worker.job
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._worker_died(worker)
            return
        if not data:  # the worker started the attempt
            worker.running = True
            worker.started = time.monotonic()
            return
        worker.job = None
        worker.running = False
        if job is None:
            return
        try:
            outcome: StepOutcome = pickle.loads(data)
        except Exception as exc:
            outcome = failure(exc, job.submitted)
        job.done(outcome)

    def _worker_died(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
        job, worker.job = worker.job, None
        code = worker.process.exitcode
        worker.kill()
        if job is not None:
            job.done(
                failure(
                    WorkerDiedError(
                        f"the worker process (pid {worker.process.pid}) died with exit code "
                        f"{code} while running the step",
                        run_id=job.call.run_id,
                        step_key=job.call.key,
                        hint="Check its memory use and native code; the step is retried "
                        "if it has retries left",
                    ),
                    job.submitted,
                    tb="",
                )
            )

    def _expire(self, busy: list[_Worker]) -> None:
        now = time.monotonic()
        for worker in busy:
            job = worker.job
            if (
                job is None
                or not worker.running
                or not job.call.timeout
                or now < worker.started + job.call.timeout
            ):
                continue
            with self._lock:
                if worker in self._workers:
                    self._workers.remove(worker)
            worker.job = None
            worker.kill()
            job.done(
                failure(
                    StepTimeoutError(
                        f"attempt {job.call.attempt} exceeded the timeout of "
                        f"{job.call.timeout} s; its worker process was stopped",
                        run_id=job.call.run_id,
                        step_key=job.call.key,
                        hint="Raise the task's timeout or make the step faster",
                    ),
                    job.submitted,
                    tb="",
                )
            )

    def cancel(self, run_id: str) -> None:
        """Queued attempts of the run are dropped; running ones finish."""
        self._cancelled.add(run_id)
        self._wake_w.send_bytes(b"1")

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            thread = self._thread
            if thread is None:
                return
        self._wake_w.send_bytes(b"1")
        if wait and thread is not threading.current_thread():
            thread.join(timeout=10)


__all__ = ["ProcessExecutor", "WorkerDiedError"]
