"""One background thread that calls functions at given times (retries, timeouts)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable


class TimerThread:
    def __init__(self, name: str = "keel-timers") -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._name = name
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Call `fn` on the timer thread at monotonic time `when` (or soon after)."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._counter), fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.call_at(time.monotonic() + max(0.0, delay), fn)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, fn = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a timer callback must never kill the timer thread
                import logging

                logging.getLogger("keel").exception("timer callback failed")


timers = TimerThread()
