"""Run ids: sortable by creation time (like a ULID), short enough to type."""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_run_id() -> str:
    """10 characters of milliseconds since the epoch, then 6 random ones."""
    ms = int(time.time() * 1000)
    head = "".join(_CROCKFORD[(ms >> (5 * i)) & 31] for i in reversed(range(10)))
    tail = "".join(secrets.choice(_CROCKFORD) for _ in range(6))
    return head + tail
