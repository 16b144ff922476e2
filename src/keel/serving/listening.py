"""The listening socket of `keel serve`, and its signals.

The socket is bound before anything else happens, so a taken port is one clear
error; uvicorn's single process or its worker processes then accept on it.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from keel.errors import ServingError

log = logging.getLogger("keel.serving")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a ServingError saying why there is none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        # As uvicorn does: a port left in TIME_WAIT by a previous server is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ServingError(
            f"cannot listen on {host}:{port}: {reason}",
            hint="Pick another port with --port"
            if exc.errno == errno.EADDRINUSE
            else "Check --host: it must be an address of this machine (e.g. 127.0.0.1)",
        ) from None
    sock.set_inheritable(True)
    return sock


@contextmanager
def graceful_signals() -> Iterator[None]:
    """uvicorn handles SIGTERM/SIGINT while it runs, then re-raises the signal with the
    handler it found. With these no-op handlers that re-raise is harmless, so a
    graceful shutdown ends the process with exit code 0 (not killed by the signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _noted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _noted(sig: int, frame: Any) -> None:
    log.info("keel serve: signal %s after shutdown", sig)
