"""Per-step capture of stdout, stderr and `logging` output.

`sys.stdout`/`sys.stderr` are process-wide, so they are replaced once by a router
that sends text to the buffer of the step running on the current thread, and to
the real stream otherwise. A root logging handler does the same for log records.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from typing import Any, TextIO


class StepLogBuffer:
    """What one attempt printed and logged and nobody has taken yet, as (stream, text)
    chunks in order. The step's threads write; live_logs takes while it runs."""

    __slots__ = ("chunks", "ended", "lock", "shipped")

    def __init__(self) -> None:
        self.chunks: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.shipped = False  # some output went to the store while the attempt ran
        self.ended = False

    def write(self, stream: str, text: str) -> None:
        with self.lock:
            chunks = self.chunks
            if chunks and chunks[-1][0] == stream:
                chunks[-1] = (stream, chunks[-1][1] + text)
            else:
                chunks.append((stream, text))

    def take_locked(self) -> list[tuple[str, str]]:
        """The chunks written since the last take (the caller holds `lock`)."""
        taken, self.chunks = self.chunks, []
        return taken


_local = threading.local()


def current_buffer() -> StepLogBuffer | None:
    return getattr(_local, "buffer", None)


def set_buffer(buffer: StepLogBuffer | None) -> None:
    _local.buffer = buffer


class _Router(io.TextIOBase):
    def __init__(self, stream_name: str, real: TextIO) -> None:
        self.stream_name = stream_name
        self.real = real

    def write(self, text: str) -> int:
        buffer = getattr(_local, "buffer", None)
        if buffer is None:
            return self.real.write(text)
        buffer.write(self.stream_name, text)
        return len(text)

    def flush(self) -> None:
        if getattr(_local, "buffer", None) is None:
            self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _StepLogHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        buffer = getattr(_local, "buffer", None)
        if buffer is not None:
            try:
                buffer.write("log", self.format(record) + "\n")
            except Exception:
                self.handleError(record)


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Route this process's output through the per-step buffers (idempotent).

    Called before every attempt: when something replaced `sys.stdout`/`sys.stderr`
    since the last call (pytest's capture, `contextlib.redirect_stdout`, a notebook),
    the new stream is wrapped too, so step output is still captured.
    """
    global _installed
    if _installed and type(sys.stdout) is _Router and type(sys.stderr) is _Router:
        return
    with _install_lock:
        if not isinstance(sys.stdout, _Router):
            sys.stdout = _Router("stdout", sys.stdout)
        if not isinstance(sys.stderr, _Router):
            sys.stderr = _Router("stderr", sys.stderr)
        if _installed:
            return
        root = logging.getLogger()
        root.addHandler(_StepLogHandler())
        # Step loggers must reach the handler even when the root level is WARNING.
        logging.getLogger("keel.step").setLevel(logging.DEBUG)
        _installed = True
