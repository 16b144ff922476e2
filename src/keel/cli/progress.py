"""Progress while a run executes on the main thread.

The run owns the main thread (so Ctrl-C reaches the engine); a background thread
only reads the session's counters. On a terminal that is a Rich live display;
otherwise a line when the run starts and a progress line now and then, so logs of
long runs in CI show the run id early.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from keel.cli.display import duration

if TYPE_CHECKING:
    from rich.live import Live

    from keel.engine.session import Progress, Session

# How often a plain (non-terminal) display reports, when something changed.
PLAIN_EVERY_SECONDS = 15.0


def counts_text(p: Progress) -> Text:
    text = Text()
    parts = [
        ("running", p.running, "cyan"),
        ("succeeded", p.succeeded, "green"),
        ("cached", p.cached, "blue"),
        ("replayed", p.replayed, "magenta"),
        ("failed", p.failed, "red"),
        ("skipped", p.skipped, "dim"),
    ]
    always = ("running", "succeeded", "failed")
    shown = [(label, v, style) for label, v, style in parts if v or label in always]
    for i, (label, value, style) in enumerate(shown):
        if i:
            text.append(" · ", style="dim")
        text.append(f"{value:,} {label}", style=style if value else "dim")
    return text


class RunMonitor:
    """Context manager showing `session.progress` until the run returns or raises."""

    def __init__(self, session: Session, console: Console, *, label: str) -> None:
        self.session = session
        self.console = console
        self.label = label
        self.started = time.monotonic()
        self._live: Live | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._spinner = Spinner("dots", style="cyan")

    @property
    def run_id(self) -> str | None:
        """The root run's id, once the engine has created it."""
        runs = self.session.runs
        return runs[0].run_id if runs else None

    # -- terminal -----------------------------------------------------------------
    def _render(self) -> RenderableType:
        p = self.session.progress
        head = Table.grid(padding=(0, 1))
        head.add_row(
            self._spinner,
            Text(self.label, style="bold"),
            Text(self.run_id or "starting", style="dim"),
            Text(duration(time.monotonic() - self.started), style="dim"),
        )
        bar = Table.grid(padding=(0, 1))
        # The graph is dynamic: `total` counts the steps created so far.
        bar.add_row(
            ProgressBar(total=max(p.total, 1), completed=p.done, width=40),
            Text(f"{p.done:,}/{p.total:,} steps"),
        )
        return Group(head, bar, counts_text(p))

    # -- plain output -----------------------------------------------------------------
    def _plain(self) -> None:
        announced = False
        last: tuple[int, int, int] | None = None
        next_report = time.monotonic() + PLAIN_EVERY_SECONDS
        while not self._stop.wait(0.2):
            if not announced and self.run_id is not None:
                self.console.print(Text(f"{self.label}: run {self.run_id} started"))
                announced = True
            if time.monotonic() < next_report:
                continue
            next_report = time.monotonic() + PLAIN_EVERY_SECONDS
            p = self.session.progress
            now = (p.total, p.done, p.running)
            if now != last:
                last = now
                line = Text(f"{p.done}/{p.total} steps done: ")
                self.console.print(line.append_text(counts_text(p)))

    # -- context manager ---------------------------------------------------------------
    def __enter__(self) -> RunMonitor:
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(
                console=self.console,
                get_renderable=self._render,
                refresh_per_second=8,
                transient=True,
            )
            self._live.start()
        else:
            self._thread = threading.Thread(
                target=self._plain, name="keel-cli-progress", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._live is not None:
            self._live.stop()
        if self._thread is not None:
            self._thread.join()
