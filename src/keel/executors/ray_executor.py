"""The Ray executor: each step attempt runs as a Ray task, on one machine or a cluster.

Connection: if Ray is already initialized in this process, keel uses that
connection; else it connects to `KEEL_RAY_ADDRESS` (`auto`, `ray://host:10001`,
`host:6379`; Ray's own `RAY_ADDRESS` is used when that is unset), or, when neither
is set, starts a new private local Ray bound to 127.0.0.1 (`KEEL_RAY_NUM_CPUS` caps
its CPUs). A Ray that keel started lives as long as the process and is reused by
every run; keel never shuts down a Ray it did not start.

Values: a step's Ray task returns two objects, the attempt's `StepOutcome` (small:
no value in it) and the value itself, which stays in Ray's object store. Its
ObjectRef is the outcome's `handle`; the engine hands it back in the `ValueRef`s of
downstream steps, and this executor passes those refs as top-level arguments of the
downstream task, so Ray moves the value from worker to worker (numpy arrays
zero-copy) and the coordinator never fetches it. The durable copy is written to the
artifact store by the worker that computed the value (`execute_step`). When a
referenced object is lost (its node died), the step is sent again with that input
loaded from the artifact store instead; its code had not started, so no attempt is
used up.

Failures: Ray's own retries are off (`max_retries=0`); a task whose worker or node
died comes back as a retryable `RayTaskLostError`, and the keel task's retry policy
decides. A user exception comes back through `execute_step` like on any executor.

Timeouts are measured from the moment the step starts on its worker (not while it
waits for resources): a SIGALRM stops Python code at the deadline; a step that does
not stop within `HARD_KILL_GRACE` seconds more (stuck in native code, or swallowing
the exception) has its worker process killed.

Completions arrive through `ObjectRef.future()` callbacks onto one queue, which a
single dispatcher thread drains: no thread per task, no polling.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from keel.errors import (
    Cancelled,
    ConfigError,
    KeelError,
    SerializationError,
)
from keel.executors.base import StepCall, StepOutcome, ValueRef, failure
from keel.executors.processes import WorkerDiedError


def _address() -> str | None:
    """The cluster to connect to, if one is configured."""
    value = os.environ.get("KEEL_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    return value.strip() or None


# A local Ray that keel starts is private to this process: bind it to the loopback
# interface (Ray reads this when it is first imported; it only changes which address
# a node started here announces).
if "ray" not in sys.modules and _address() is None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
import ray.exceptions as rex  # noqa: E402

from keel.executors.ray_worker import HARD_KILL_GRACE, Arg, remote_step, timeout_error  # noqa: E402

# The `executor_options` this executor understands, passed to Ray as they are.
RAY_OPTIONS = ("runtime_env", "scheduling_strategy", "accelerator_type")


class RayTaskLostError(WorkerDiedError):
    """The Ray worker or node running the step died, or Ray lost the task's result."""

    retryable = True


# -- connecting --------------------------------------------------------------------------

_connect_lock = threading.Lock()
_started_by_keel = False


def connect() -> None:
    """Use this process's Ray connection; make one if there is none (see the module doc)."""
    global _started_by_keel
    if ray.is_initialized():
        return
    with _connect_lock:
        if ray.is_initialized():
            return
        import logging

        address = _address()
        common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        try:
            if address is not None:
                ray.init(address=address, **common)
            else:
                cpus = os.environ.get("KEEL_RAY_NUM_CPUS", "").strip()
                ray.init(
                    address="local",  # a new instance, never one found on the machine
                    num_cpus=int(cpus) if cpus else None,
                    include_dashboard=False,
                    **common,
                )
                _started_by_keel = True
        except Exception as exc:
            where = f"the Ray cluster at {address!r}" if address else "a local Ray"
            raise ConfigError(
                f"cannot start or reach {where}: {type(exc).__name__}: {exc}",
                hint="Set KEEL_RAY_ADDRESS to `auto`, `ray://HOST:10001` or `HOST:6379` for "
                "a running cluster, or unset it to start a local Ray",
            ) from None


def started_by_keel() -> bool:
    """True when the Ray this process uses was started by keel (so keel owns it)."""
    return _started_by_keel


# -- the coordinator side ----------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    call: StepCall
    done: Callable[[StepOutcome], None]
    submitted: float
    outcome_ref: Any = None
    value_ref: Any = None
    arg_refs: list[Any] = field(default_factory=list)
    resends: int = 0


def ray_options(call: StepCall) -> dict[str, Any]:
    """Ray task options for the step's resource request and `executor_options`."""
    unknown = sorted(set(call.options) - set(RAY_OPTIONS))
    if unknown:
        raise ConfigError(
            f"task {call.task}: the Ray executor does not understand executor_options "
            f"{', '.join(map(repr, unknown))} (it understands {', '.join(RAY_OPTIONS)})",
            hint="Fix the task's executor_options",
        )
    opts: dict[str, Any] = {k: v for k, v in call.options.items() if v is not None}
    custom: dict[str, float] = {}
    for name, amount in call.resources.items():
        if name == "cpus":
            opts["num_cpus"] = amount
        elif name == "gpus":
            opts["num_gpus"] = amount
        elif name == "memory":
            opts["memory"] = int(amount)
        else:
            custom[name] = amount
    if custom:
        opts["resources"] = custom
    return opts


class RayExecutor:
    name = "ray"
    in_process = False

    def __init__(self, max_workers: int) -> None:
        # Ray's scheduler places work by resources; the engine's concurrency limits
        # decide how many steps are in flight, so `max_workers` is not used here.
        self.max_workers = max_workers
        connect()
        self._lock = threading.Lock()
        self._jobs: dict[Any, _Job] = {}  # outcome ref -> job, while in flight
        self._lost: set[Any] = set()  # object refs known to be lost
        self._cancelled: set[str] = set()
        self._options: dict[tuple[Any, ...], Any] = {}
        self._queue: queue.SimpleQueue[tuple[_Job, Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="keel-ray", daemon=True)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------
    def submit(self, call: StepCall, done: Callable[[StepOutcome], None]) -> None:
        job = _Job(call, done, time.time())
        if call.run_id in self._cancelled:
            done(failure(Cancelled(call.run_id), job.submitted, tb=""))
            return
        self._send(job)

    def _remote_for(self, call: StepCall) -> Any:
        if not call.resources and not call.options:
            key: tuple[Any, ...] = ()
        else:
            key = (tuple(sorted(call.resources.items())), repr(sorted(call.options.items())))
        remote = self._options.get(key)
        if remote is None:
            opts = ray_options(call)
            try:
                remote = remote_step(**opts)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"task {call.task}: Ray refused its resources or executor_options: {exc}",
                    hint="Check the task's `resources` and `executor_options`",
                ) from None
            self._options[key] = remote
        return remote

    def _send(self, job: _Job) -> None:
        call = job.call
        try:
            remote = self._remote_for(call)
        except KeelError as exc:
            exc.run_id, exc.step_key = call.run_id, call.key
            exc.args = (exc._render(),)
            job.done(failure(exc, job.submitted, tb=""))
            return
        refs: list[Any] = []
        sent = call
        if _has_refs(call.args) or _has_refs(call.kwargs):
            args = self._detach(call.args, refs)
            kwargs = self._detach(call.kwargs, refs)
            sent = replace(call, args=args, kwargs=kwargs)
        sent.keep_value = False
        try:
            outcome_ref, value_ref = remote.remote(sent, *refs)
        except Exception as exc:
            err = SerializationError(
                f"cannot send step {call.key} to Ray: {type(exc).__name__}: {exc}",
                run_id=call.run_id,
                step_key=call.key,
                hint="Its function and inputs must be picklable",
            )
            job.done(failure(err, job.submitted, tb=""))
            return
        job.outcome_ref, job.value_ref, job.arg_refs = outcome_ref, value_ref, refs
        with self._lock:
            self._jobs[outcome_ref] = job
        outcome_ref.future().add_done_callback(lambda fut: self._queue.put((job, fut)))

    def _detach(self, value: Any, refs: list[Any]) -> Any:
        """Take the object refs out of the arguments, leaving `Arg` markers in their place."""
        kind = type(value)
        if kind is ValueRef:
            handle = value.handle
            if isinstance(handle, ray.ObjectRef) and handle not in self._lost:
                refs.append(handle)
                return Arg(len(refs) - 1)
            return value  # loaded from the artifact store on the worker
        if kind is list or kind is tuple:
            return kind(self._detach(v, refs) for v in value)
        if kind is dict:
            return {k: self._detach(v, refs) for k, v in value.items()}
        return value

    # -- completing ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, fut = item
            try:
                self._complete(job, fut)
            except Exception:  # never let one outcome stop the dispatcher
                import logging

                logging.getLogger("keel").exception("Ray executor: cannot deliver an outcome")

    def _complete(self, job: _Job, fut: Any) -> None:
        with self._lock:
            if self._jobs.pop(job.outcome_ref, None) is None:
                return  # already delivered (shut down)
        try:
            outcome: StepOutcome = fut.result()
        except BaseException as exc:
            failed = self._failed(job, exc)
            if failed is None:
                return  # sent again
            job.done(failed)
            return
        outcome.handle = job.value_ref if outcome.ok else None
        job.done(outcome)

    def _failed(self, job: _Job, exc: BaseException) -> StepOutcome | None:
        """The outcome for a task that Ray failed; None when the step was sent again."""
        call = job.call
        cause = exc.cause if isinstance(exc, rex.RayTaskError) and exc.cause is not None else exc
        interrupted = isinstance(cause, (rex.TaskCancelledError, KeyboardInterrupt))
        if interrupted and call.run_id in self._cancelled:
            return failure(Cancelled(call.run_id), job.submitted, tb="")
        if isinstance(cause, rex.ObjectLostError):
            lost = next((r for r in job.arg_refs if r.hex() == cause.object_ref_hex), None)
            if lost is not None and job.resends <= len(job.arg_refs):
                # An input's object is gone (its node died) before the step started:
                # send the step again, reading that input from the artifact store.
                with self._lock:
                    self._lost.add(lost)
                job.resends += 1
                job.submitted = time.time()
                self._send(job)
                return None
        tb = exc.traceback_str if isinstance(exc, rex.RayTaskError) else ""
        if isinstance(cause, rex.RayError) and not isinstance(cause, rex.RuntimeEnvSetupError):
            if (
                isinstance(cause, rex.WorkerCrashedError)
                and call.timeout is not None
                and time.time() - job.submitted >= call.timeout
            ):
                err: KeelError = timeout_error(
                    call, f"; its Ray worker was killed after {HARD_KILL_GRACE} s more"
                )
            else:
                err = RayTaskLostError(
                    f"the Ray task running the step was lost: {type(cause).__name__}: "
                    f"{_first_line(cause)}",
                    run_id=call.run_id,
                    step_key=call.key,
                    hint="The step is retried if it has retries left",
                )
            return failure(err, job.submitted, tb=tb)
        # Not a system failure: e.g. the worker cannot import the step's module, or
        # Ray cannot serialize the step's value, or its runtime_env cannot be set up.
        out = failure(cause, job.submitted, tb=tb or None)
        out.retryable = False
        if not isinstance(cause, KeelError):
            out.error_message = (
                f"{out.error_message} (while running step {call.key} on Ray; the workers "
                "must be able to import the step's code, e.g. through a runtime_env)"
            )
        return out

    # -- cancelling and closing ----------------------------------------------------------
    def cancel(self, run_id: str) -> None:
        """Drop the run's queued Ray tasks and interrupt its running ones (best effort)."""
        self._cancelled.add(run_id)
        with self._lock:
            refs = [ref for ref, job in self._jobs.items() if job.call.run_id == run_id]
        for ref in refs:
            try:
                ray.cancel(ref)
            except Exception:
                pass

    def shutdown(self, wait: bool = True) -> None:
        """Stop the dispatcher and cancel tasks still in flight; Ray itself stays up."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._jobs)
            self._jobs.clear()
        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:
                pass
        self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def _has_refs(value: Any) -> bool:
    kind = type(value)
    if kind is ValueRef:
        return value.handle is not None
    if kind is list or kind is tuple:
        return any(_has_refs(v) for v in value)
    if kind is dict:
        return any(_has_refs(v) for v in value.values())
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


__all__ = ["RayExecutor", "RayTaskLostError", "connect", "ray_options", "started_by_keel"]
