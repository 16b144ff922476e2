"""A server's traffic for its deployment row: totals since start, and the request rate
and latency percentiles over the last minute, written with each heartbeat.

Requests append (time, latency) to a bounded deque (cheap, on the request's path); the
heartbeat thread reads a snapshot. At a very high rate the deque keeps only the newest
`KEPT` latencies, which is enough for the percentiles; the rate comes from the totals.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

WINDOW_SECONDS = 60.0
KEPT = 20_000


class Traffic:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self._latencies: deque[tuple[float, float]] = deque(maxlen=KEPT)
        self._totals: deque[tuple[float, int]] = deque()  # (time, requests) per snapshot
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def observe(self, seconds: float, error: bool) -> None:
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.errors += int(error)
            self._latencies.append((now, seconds))

    def snapshot(self) -> dict[str, Any]:
        """requests, errors (totals), rate (per second), p50_ms and p95_ms (last minute;
        None when no request came in it)."""
        import numpy as np

        now = time.monotonic()
        cutoff = now - WINDOW_SECONDS
        with self._lock:
            requests, errors = self.requests, self.errors
            while self._latencies and self._latencies[0][0] < cutoff:
                self._latencies.popleft()
            recent = [seconds for _, seconds in self._latencies]
            while self._totals and self._totals[0][0] < cutoff:
                self._totals.popleft()
            then, before = self._totals[0] if self._totals else (self._started, 0)
            self._totals.append((now, requests))
        span = now - then
        rate = (requests - before) / span if span > 0 else 0.0
        p50 = p95 = None
        if recent:
            p50, p95 = (float(q) * 1000.0 for q in np.percentile(recent, [50, 95]))
        return {"requests": requests, "errors": errors, "rate": rate, "p50_ms": p50, "p95_ms": p95}
