"""A server's traffic for its deployment row: totals since start, and the request rate
and latency percentiles over the last minute, written with each heartbeat.

A request adds to a per-second bucket (60 of them, reused round the clock) and appends
its latency to a bounded deque: cheap, on the request's path. The heartbeat thread
reads a snapshot. At a very high rate the deque keeps only the newest `KEPT`
latencies, enough for the percentiles; the rate comes from the buckets, exactly.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

WINDOW_SECONDS = 60
KEPT = 20_000


class Traffic:
    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self._latencies: deque[tuple[float, float]] = deque(maxlen=KEPT)
        self._seconds = [-1] * WINDOW_SECONDS  # which second each bucket counts
        self._counts = [0] * WINDOW_SECONDS
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def observe(self, seconds: float, error: bool) -> None:
        now = time.monotonic()
        second = int(now)
        slot = second % WINDOW_SECONDS
        with self._lock:
            self.requests += 1
            self.errors += int(error)
            if self._seconds[slot] != second:
                self._seconds[slot], self._counts[slot] = second, 0
            self._counts[slot] += 1
            self._latencies.append((now, seconds))

    def snapshot(self) -> dict[str, Any]:
        """requests, errors (totals), rate (per second), p50_ms and p95_ms (last minute;
        None when no request came in it)."""
        import numpy as np

        now = time.monotonic()
        with self._lock:
            requests, errors = self.requests, self.errors
            while self._latencies and self._latencies[0][0] < now - WINDOW_SECONDS:
                self._latencies.popleft()
            recent = [seconds for _, seconds in self._latencies]
            first = int(now) - WINDOW_SECONDS + 1
            counted = sum(c for s, c in zip(self._seconds, self._counts, strict=True) if s >= first)
        span = min(float(WINDOW_SECONDS), max(now - self._started, 1.0))
        p50 = p95 = None
        if recent:
            p50, p95 = (float(q) * 1000.0 for q in np.percentile(recent, [50, 95]))
        return {
            "requests": requests,
            "errors": errors,
            "rate": counted / span,
            "p50_ms": p50,
            "p95_ms": p95,
        }
