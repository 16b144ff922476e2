"""When a failed attempt is tried again, and after how long."""

from __future__ import annotations

import random

from keel.errors import qualified_name
from keel.executors.base import StepOutcome
from keel.sdk.definitions import TaskOptions


def should_retry(opts: TaskOptions, attempt: int, outcome: StepOutcome) -> bool:
    """`attempt` is the number of the attempt that just failed (1-based)."""
    if attempt > opts.retries or outcome.retryable is False:
        return False
    if outcome.retryable:
        return True
    # Match by qualified class names so errors that crossed a process boundary
    # without their exception object are judged the same way.
    wanted = {qualified_name(t) for t in opts.retry_on}
    return any(name in wanted for name in outcome.error_mro)


def retry_delay(opts: TaskOptions, attempt: int) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential backoff with jitter."""
    base = min(opts.retry_max_delay, opts.retry_delay * opts.retry_backoff ** (attempt - 1))
    spread = base * opts.retry_jitter
    return max(0.0, base + random.uniform(-spread, spread))
