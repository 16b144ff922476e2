"""Durable timers and signal waits, recorded as steps of kind `timer` / `signal`.

A wait's step row holds its deadline as its output while it waits, so a replay
waits only for what is left; once over, the row holds the outcome (nothing for a
timer, the payload for a signal, a timeout error), which replay returns as is.
Waits longer than `SUSPEND_AFTER` park the run (see errors.Suspended).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from keel.errors import Cancelled, SignalTimeoutError, Suspended
from keel.status import StepStatus
from keel.store import signals
from keel.store.values import StoredValue, store_value

if TYPE_CHECKING:
    from keel.engine.run import RunState

# Shorter waits block the workflow body's thread; longer ones park the run.
SUSPEND_AFTER = 2.0
_POLL = 0.1


def _deadline_row(
    state: RunState, seq: int, key: str, name: str, kind: str, info: dict[str, Any]
) -> None:
    stored = store_value(info, artifacts_url=state.artifacts_url, inline_limit=1 << 20)
    state.record_wait(seq, key, name, kind, StepStatus.RUNNING, stored=stored)


def _wait_briefly(state: RunState, until: float, ready: Any = None) -> bool:
    """Block until `until` (or until `ready()` is true); False if cancelled."""
    while True:
        if state.session.cancelled:
            raise Cancelled(state.run_id)
        if ready is not None and ready():
            return True
        remaining = until - time.time()
        if remaining <= 0:
            return False
        time.sleep(min(_POLL, remaining))


def durable_sleep(state: RunState, seconds: float) -> None:
    seq, key, row = state.allocate_wait("sleep", "timer")
    if row is not None and row.status == StepStatus.SUCCEEDED:
        return
    if row is not None and row.output_inline:
        wake_at = float(json.loads(row.output_inline)["wake_at"])
    else:
        wake_at = time.time() + seconds
        _deadline_row(state, seq, key, "sleep", "timer", {"wake_at": wake_at})
    if wake_at - time.time() > SUSPEND_AFTER:
        raise Suspended(state.run_id, wake_at, f"sleeping until {time.ctime(wake_at)}")
    _wait_briefly(state, wake_at)
    state.record_wait(seq, key, "sleep", "timer", StepStatus.SUCCEEDED)


def wait_for_signal(state: RunState, name: str, timeout: float | None) -> Any:
    label = f"signal:{name}"
    seq, key, row = state.allocate_wait(label, "signal")
    if row is not None and row.status == StepStatus.SUCCEEDED:
        return StoredValue(
            row.output_serializer, row.output_hash or "", 0, "", row.output_inline, row.output_ref
        ).load(state.artifacts_url)
    if row is not None and row.status == StepStatus.FAILED:
        raise SignalTimeoutError(
            f"no signal {name!r} arrived in time", run_id=state.run_id, step_key=key
        )
    deadline: float | None
    if row is not None and row.output_inline:
        deadline = json.loads(row.output_inline).get("deadline")
    else:
        deadline = None if timeout is None else time.time() + timeout
        _deadline_row(state, seq, key, label, "signal", {"deadline": deadline, "signal": name})
    store = state.session.store
    payload = signals.consume(store, state.run_id, name, seq)
    if (
        payload is signals.MISSING
        and deadline is not None
        and deadline - time.time() <= SUSPEND_AFTER
    ):
        found: list[Any] = []

        def arrived() -> bool:
            value = signals.consume(store, state.run_id, name, seq)
            if value is signals.MISSING:
                return False
            found.append(value)
            return True

        if _wait_briefly(state, deadline, arrived):
            payload = found[0]
    if payload is not signals.MISSING:
        stored = store_value(
            payload,
            artifacts_url=state.artifacts_url,
            inline_limit=state.session.inline_limit,
            describe=lambda: f"payload of signal {name!r}",
        )
        state.record_wait(seq, key, label, "signal", StepStatus.SUCCEEDED, stored=stored)
        return payload
    if deadline is not None and time.time() >= deadline:
        error = SignalTimeoutError(
            f"no signal {name!r} arrived within the timeout",
            run_id=state.run_id,
            step_key=key,
            hint=f"Send it with `keel signal {state.run_id} {name} --data JSON`",
        )
        state.record_wait(seq, key, label, "signal", StepStatus.FAILED, error=error)
        raise error
    raise Suspended(state.run_id, deadline, f"waiting for signal {name!r}")
