"""Formatting shared by the commands: consoles, statuses, times, sizes, reprs.

User data (parameters, reprs, error messages, logs) goes into `rich.text.Text`
objects, never into markup strings, so brackets in it are shown as they are.
"""

from __future__ import annotations

import os
import reprlib
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

STATUS_STYLES = {
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
    "RUNNING": "cyan",
    "PENDING": "dim",
    "CACHED": "blue",
    "SKIPPED": "dim",
}

# Wide enough that ids and messages do not wrap when output goes to a file or pipe.
_PIPE_WIDTH = 160


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else _PIPE_WIDTH
    return Console(stderr=stderr, highlight=False, width=width)


def status_text(status: str | None) -> Text:
    text = status or "?"
    return Text(text, style=STATUS_STYLES.get(text, ""))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def when(moment: datetime | None) -> str:
    """A recorded time in the local time zone (the store keeps UTC)."""
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


_repr = reprlib.Repr()
_repr.maxstring = 120
_repr.maxother = 120
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxdict = 10


def short_repr(value: Any, limit: int = 200) -> str:
    """A repr that stays on a line or two however big the value is."""
    try:
        text = _repr.repr(value)
    except Exception as exc:  # a broken __repr__ must not break the summary
        text = f"<{type(value).__name__} (repr failed: {exc})>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_KEEL_DIR = str(Path(__file__).resolve().parent.parent)


def user_traceback(text: str) -> str:
    """A stored traceback without keel's own frames, which only say how a step was called.

    Empty when every frame was keel's (the error line, shown anyway, says it all).
    """
    lines = text.rstrip().splitlines()
    out: list[str] = []
    skipping = False
    user_frames = 0
    for line in lines:
        if line.startswith('  File "'):
            skipping = line[len('  File "') :].startswith(_KEEL_DIR)
            if not skipping:
                user_frames += 1
                out.append(line)
        elif skipping and line.startswith("    "):
            continue
        else:
            skipping = False
            out.append(line)
    return "\n".join(out) if user_frames else ""
