"""Riding out database blips: retry an operation while the database is unreachable.

A PostgreSQL restart or a dropped connection raises OperationalError (or
InterfaceError) for a while; callers that must not lose or strand work wrap their
store calls here and try again with backoff instead of failing the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa

T = TypeVar("T")
log = logging.getLogger("keel.store")

# How long to keep trying before giving up (a restart with a long checkpoint can
# take well over a minute).
RETRY_SECONDS = float(os.environ.get("KEEL_DB_RETRY_SECONDS", "300"))
_TRANSIENT = (sa.exc.OperationalError, sa.exc.InterfaceError)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT)


def with_retry(fn: Callable[[], T], *, what: str, seconds: float | None = None) -> T:
    """Call `fn`, retrying while the database is unreachable, up to `seconds`."""
    deadline = time.monotonic() + (RETRY_SECONDS if seconds is None else seconds)
    delay = 0.05
    while True:
        try:
            return fn()
        except _TRANSIENT as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("%s failed (database unreachable?), retrying: %s", what, exc)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
