"""SIGTERM handled like Ctrl-C.

`timeout`, systemd, Docker, Kubernetes and CI runners stop a process with SIGTERM.
Left to its default, SIGTERM ends the process at once and the run stays RUNNING with
nothing to say it stopped. While a run executes on the main thread, SIGTERM instead
raises `Terminated` (a `KeyboardInterrupt`) there, so the engine records the run as
CANCELLED, resumable, exactly as it does for Ctrl-C.

A handler someone else installed (a worker, a server, the application) is left alone.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from keel.errors import Terminated


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt(*, then_die: bool = False) -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` on the main thread (unless another
    handler is installed, or this is not the main thread).

    `then_die`: once the block has let `Terminated` out (the run is recorded), end the
    process by SIGTERM as the default handler would have (exit status 143 in a shell),
    for Python programs that call `keel.run` and expect SIGTERM to stop them.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if then_die:
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
