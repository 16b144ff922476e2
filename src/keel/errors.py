"""Typed errors. Every keel error derives from `KeelError`, carries the run and
step it concerns, and says what the user can do about it.

Retry behaviour lives in fields (`retryable`), never in message text.
Cancellation derives from `BaseException` so that `except Exception` in user
code cannot swallow it.
"""

from __future__ import annotations

import errno
import os
import signal


class KeelError(Exception):
    """Root of every error keel raises."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.run_id = run_id
        self.step_key = step_key
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.run_id:
            where.append(f"run {self.run_id}")
        if self.step_key:
            where.append(f"step {self.step_key}")
        text = self.message
        if where:
            text = f"{text} ({', '.join(where)})"
        if self.hint:
            text = f"{text}. {self.hint}"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields must survive pickling (process and Ray executors).
        return (_rebuild, (type(self), self.message, self.run_id, self.step_key, self.hint))


def _rebuild(
    cls: type[KeelError], message: str, run_id: str | None, step_key: str | None, hint: str | None
) -> KeelError:
    err = cls.__new__(cls)
    KeelError.__init__(err, message, run_id=run_id, step_key=step_key, hint=hint)
    return err


def qualified_name(cls: type) -> str:
    """`ValueError` for builtins, `package.module.Class` for everything else."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_error(exc: BaseException) -> str:
    """The error's message, never empty: some exceptions carry none (`MemoryError()`
    has the text ""), so fall back to what their type and errno say."""
    text = exc.message if isinstance(exc, KeelError) else str(exc)
    if text.strip():
        return text
    name = qualified_name(type(exc))
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and isinstance(code, int):
        return f"{name} [Errno {code}] {os.strerror(code)} (raised without a message)"
    doc = (type(exc).__doc__ or "").strip().splitlines()
    what = f": {doc[0].strip()}" if doc and doc[0].strip() else ""
    return f"{name} raised without a message{what}"


# What to do about a failed run, judged from its error's type (as recorded, so a run
# read back from the store is judged like one that just ended).
FIX_RESUME = "resume"  # the environment failed (disk, memory, store): resume the same run
FIX_RETRY = "retry"  # the code failed: fix it, then retry (reuses succeeded steps)
FIX_NEW_RUN = "new run"  # a parameter was bad: neither helps, start a new run

_ENVIRONMENT_ERRORS = frozenset(
    {
        "MemoryError",
        "OSError",  # ENOSPC, EIO, EDQUOT... arrive as plain OSError
        "BlockingIOError",
        "ConnectionError",
        "ConnectionAbortedError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "BrokenPipeError",
        "TimeoutError",
        "keel.errors.StoreUnavailableError",
        "sqlalchemy.exc.OperationalError",
        "sqlalchemy.exc.InterfaceError",
        "sqlalchemy.exc.DisconnectionError",
    }
)
_ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)


def fix_for(error_type: str | None, message: str | None = None) -> str:
    """FIX_RESUME, FIX_RETRY or FIX_NEW_RUN for a run that failed with this error."""
    if error_type in _ENVIRONMENT_ERRORS:
        return FIX_RESUME
    if message and any(f"[Errno {code}]" in message for code in _ENVIRONMENT_ERRNOS):
        return FIX_RESUME  # an OSError subclass raised for a full disk or the like
    if error_type == "keel.errors.ParameterError":
        return FIX_NEW_RUN
    return FIX_RETRY


class ConfigError(KeelError):
    """Bad configuration: a database URL, an artifact location, an environment variable."""


class StoreUnavailableError(KeelError):
    """The metadata store cannot be opened or reached."""

    retryable = True


class DefinitionError(KeelError):
    """A task or workflow is defined or located wrongly (unknown file, unknown name)."""


class ParameterError(KeelError):
    """A workflow parameter is missing, unknown, or of the wrong type."""


class RunNotFoundError(KeelError):
    """No run with that id exists in the store."""


class StepNotFoundError(KeelError):
    """No step with that key exists in the run."""


class RunStateError(KeelError):
    """The run is in a state that does not allow the operation (e.g. still running elsewhere)."""


class NonDeterminismError(KeelError):
    """Replay reached a recorded position where the code now calls something else."""


class SerializationError(KeelError):
    """A step output or input cannot be serialized or read back."""


class ForeignFutureError(KeelError):
    """A future from one run was passed to a step of another run."""


class TrackingError(KeelError):
    """A tracking call got bad input: a bad key, an over-long value, a param logged
    twice with different values, a filter that does not parse."""


class InvalidValueError(TrackingError, ValueError):
    """A value the store cannot hold exactly: a NUL character, a lone surrogate (text
    that is not valid Unicode), a number out of range, a key or value over its column's
    size. `field` names what was bad (e.g. `param key`, `metrics[2].step`)."""

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        run_id: str | None = None,
        step_key: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.field = field
        super().__init__(message, run_id=run_id, step_key=step_key, hint=hint)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_invalid,
            (type(self), self.message, self.field, self.run_id, self.step_key, self.hint),
        )


def _rebuild_invalid(
    cls: type[InvalidValueError],
    message: str,
    field: str | None,
    run_id: str | None,
    step_key: str | None,
    hint: str | None,
) -> InvalidValueError:
    return cls(message, field=field, run_id=run_id, step_key=step_key, hint=hint)


class StepFailedError(KeelError):
    """A step failed and its original exception could not be brought back as it was."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        hint: str | None = None,
        error_type: str | None = None,
    ) -> None:
        self.error_type = error_type
        super().__init__(message, run_id=run_id, step_key=step_key, hint=hint)


class UpstreamFailedError(KeelError):
    """The step was skipped because a step it depends on failed."""

    root_error: BaseException | None = None  # the error of the step that really failed


class StepTimeoutError(KeelError):
    """An attempt ran longer than the task's `timeout`."""

    retryable = True


class RunFailedError(KeelError):
    """Raised by `RunHandle.result()` when the run did not succeed."""

    def __init__(
        self,
        message: str,
        *,
        run_id: str | None = None,
        step_key: str | None = None,
        hint: str | None = None,
        error_type: str | None = None,
        traceback: str | None = None,
    ) -> None:
        self.error_type = error_type
        self.traceback = traceback
        super().__init__(message, run_id=run_id, step_key=step_key, hint=hint)


class SignalTimeoutError(KeelError):
    """`keel.wait_for_signal` reached its timeout before the signal arrived."""


class Suspended(BaseException):
    """Raised inside a workflow body to park the run until `wake_at` (or a signal).

    The engine records the run as PENDING and queues it; whoever claims it then
    (this process, or any worker) continues it by replay. Never shown to users.
    """

    def __init__(self, run_id: str, wake_at: float | None, reason: str) -> None:
        self.run_id = run_id
        self.wake_at = wake_at
        self.reason = reason
        super().__init__(f"run {run_id} suspended: {reason}")


class Cancelled(BaseException):
    """The run was cancelled; raised inside the workflow body to unwind it."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(f"run {run_id} was cancelled")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a run executed on the main thread. A `KeyboardInterrupt`,
    so the engine stops the run as it does on Ctrl-C (recorded CANCELLED, resumable)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


class ChildDepthError(KeelError):
    """A chain of child runs (a workflow calling a workflow calling...) went deeper
    than the limit (`KEEL_MAX_CHILD_DEPTH`): usually a recursion with no base case."""


class ModelRegistryError(KeelError):
    """Bad input to the model registry: a bad model name, alias, URI or flavor, or
    something that is not a model."""


class ModelNotFoundError(ModelRegistryError):
    """No registered model, version, alias or logged model matches what was asked for."""


class SignatureError(KeelError):
    """Data given to a loaded model does not match the model's input signature."""


class ScheduleError(DefinitionError):
    """A schedule, backfill or trigger is defined wrongly (a bad cron expression, an
    unknown time zone, an end before its start) or names one that does not exist."""


class ArtifactWriteError(KeelError):
    """The artifact store could not take a write (a full disk, a read-only or unreachable
    store): an environment fault, fixed outside the code, after which `keel resume`
    continues the run."""


class ArtifactIntegrityError(KeelError):
    """A stored file no longer holds the bytes it was recorded with: it was changed
    after it was written. keel refuses to register or load it."""


class InputDataError(KeelError):
    """Data given for batch prediction cannot be read (a missing file, an unknown
    format, a corrupt table) or cannot be split into rows."""


class ServingError(KeelError):
    """`keel serve` cannot start or serve: the port is taken, an option is out of
    range, the target is neither a model URI nor a workflow reference."""
