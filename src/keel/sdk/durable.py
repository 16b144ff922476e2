"""Durable waits inside a workflow: `keel.sleep` and `keel.wait_for_signal`.

Both are recorded as steps, so a resumed run neither sleeps again for time already
slept nor sees a different signal payload. A long wait parks the run without
holding a thread: it is continued by whichever keel process claims it when the
time comes or the signal arrives.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from keel.errors import DefinitionError
from keel.sdk.context import current_runtime


def _seconds(duration: float | timedelta, what: str) -> float:
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else duration
    if not isinstance(seconds, (int, float)) or seconds < 0:
        raise DefinitionError(
            f"{what} needs a duration of zero or more seconds, got {duration!r}",
            hint="Pass seconds as a number, or a datetime.timedelta",
        )
    return float(seconds)


def sleep(duration: float | timedelta) -> None:
    """Wait durably for `duration`. Outside a workflow this is `time.sleep`."""
    seconds = _seconds(duration, "keel.sleep")
    runtime = current_runtime()
    if runtime is None:
        time.sleep(seconds)
        return
    runtime.durable_sleep(seconds)


def wait_for_signal(name: str, timeout: float | timedelta | None = None) -> Any:
    """Wait for the signal `name` sent to this run and return its payload.

    Signals sent before the wait are kept and delivered in the order they were
    sent, one per wait. After `timeout`, raises `keel.SignalTimeoutError`.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise DefinitionError(f"a signal name must be a non-empty string, got {name!r}")
    seconds = None if timeout is None else _seconds(timeout, "keel.wait_for_signal")
    runtime = current_runtime()
    if runtime is None:
        raise DefinitionError(
            f"keel.wait_for_signal({name!r}) was called outside a workflow",
            hint="Signals are sent to runs: call it inside a @keel.workflow body",
        )
    return runtime.wait_for_signal(name, seconds)
