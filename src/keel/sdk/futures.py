"""Futures for steps, and `wait` / `gather` over them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, Literal, Protocol, TypeVar

T = TypeVar("T")

_PENDING = object()


class FutureOwner(Protocol):
    """The run a future belongs to: it guards the future's state and loads stored values."""

    run_id: str
    lock: threading.Lock

    def load_value(self, future: StepFuture[Any]) -> Any: ...


class StepFuture(Generic[T]):
    """The eventual output of one step. Pass it to another task to make a dependency edge."""

    __slots__ = (
        "_callbacks",
        "_error",
        "_event",
        "_observed",
        "_owner",
        "_value",
        "done_flag",
        "handle",
        "key",
        "seq",
        "stored",
    )

    def __init__(self, owner: FutureOwner, seq: int, key: str) -> None:
        self._owner = owner
        self.seq = seq
        self.key = key
        self.done_flag = False
        self._value: Any = _PENDING
        self.stored: Any = None  # the engine's StoredValue, when the output was recorded
        self.handle: Any = None  # the executor's reference to the value, if it keeps one
        self._error: BaseException | None = None
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[StepFuture[T]], None]] | None = None
        self._observed = False

    @property
    def run_id(self) -> str:
        return self._owner.run_id

    def __repr__(self) -> str:
        state = "pending" if not self.done_flag else ("failed" if self._error else "done")
        return f"<StepFuture {self.key} of run {self.run_id}: {state}>"

    def done(self) -> bool:
        return self.done_flag

    def result(self, timeout: float | None = None) -> T:
        """Wait for the step and return its output, or raise its error."""
        if not self.done_flag:
            with self._owner.lock:
                if not self.done_flag and self._event is None:
                    self._event = threading.Event()
                event = self._event
            if event is not None and not event.wait(timeout):
                raise TimeoutError(f"step {self.key} did not finish within {timeout} s")
        if self._error is not None:
            self._observed = True
            raise self._error
        if self._value is _PENDING:
            self._value = self._owner.load_value(self)
        return self._value  # type: ignore[no-any-return]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            return exc
        return None

    def add_done_callback(self, fn: Callable[[StepFuture[T]], None]) -> None:
        with self._owner.lock:
            if not self.done_flag:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        fn(self)

    # -- engine side ----------------------------------------------------------
    def has_live_value(self) -> bool:
        return self._value is not _PENDING

    def peek_error(self) -> BaseException | None:
        return self._error

    def was_observed(self) -> bool:
        return self._observed

    def _complete_locked(
        self, value: Any = _PENDING, error: BaseException | None = None, stored: Any = None
    ) -> list[Callable[[StepFuture[T]], None]]:
        """Mark done while the owner's lock is held; returns callbacks to run after release."""
        self._value = value
        self._error = error
        if stored is not None:
            self.stored = stored
        self.done_flag = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, None
        return callbacks or []


def _flatten(fs: Iterable[Any]) -> list[StepFuture[Any]]:
    out: list[StepFuture[Any]] = []
    for f in fs:
        if isinstance(f, StepFuture):
            out.append(f)
        elif isinstance(f, (list, tuple, set)):
            out.extend(_flatten(f))
        else:
            raise TypeError(f"expected StepFuture, got {type(f).__name__}")
    return out


def wait(
    futures: Iterable[StepFuture[Any]],
    timeout: float | None = None,
    return_when: Literal["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION"] = "ALL_COMPLETED",
) -> tuple[list[StepFuture[Any]], list[StepFuture[Any]]]:
    """Block until the futures finish (or the first does); return (done, not_done)."""
    pending = _flatten(futures)
    wake = threading.Event()

    def check(_: StepFuture[Any]) -> None:
        wake.set()

    for f in pending:
        f.add_done_callback(check)
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        done = [f for f in pending if f.done()]
        not_done = [f for f in pending if not f.done()]
        if not not_done:
            return done, not_done
        if return_when == "FIRST_COMPLETED" and done:
            return done, not_done
        if return_when == "FIRST_EXCEPTION" and any(f.peek_error() for f in done):
            return done, not_done
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return done, not_done
        wake.wait(remaining)
        wake.clear()


def gather(*futures: StepFuture[Any] | Iterable[StepFuture[Any]]) -> list[Any]:
    """The outputs of the futures, in order; raises the first error met."""
    return [f.result() for f in _flatten(futures)]


class _Detached:
    """Owner of futures made outside any run (a task `.submit()`ted in a plain call)."""

    run_id = "(no run)"

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def load_value(self, future: StepFuture[Any]) -> Any:  # pragma: no cover - never stored
        raise AssertionError("detached futures always hold their value")


_detached = _Detached()


def completed_future(compute: Callable[[], T], name: str) -> StepFuture[T]:
    """Run `compute` now and wrap its outcome in a finished future."""
    future: StepFuture[T] = StepFuture(_detached, -1, name)
    try:
        value = compute()
    except Exception as exc:
        future._complete_locked(error=exc)
    else:
        future._complete_locked(value=value)
    return future
