"""The deployment's row of a running server: written at start, a heartbeat every
few seconds from a thread (with the server's traffic), marked stopped at the end. The
store failing never stops serving: a failed write is logged, and the next heartbeat
tries again."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.serving")


class Record:
    """The deployment's row: inserted now, heartbeats from a thread, stopped at the end."""

    def __init__(self, store: MetadataStore, values: dict[str, Any]) -> None:
        from keel.store import deployments

        self.store = store
        self.id = str(values["id"])
        self._done = threading.Event()
        # The server's traffic (serving/traffic.py), written with each heartbeat; set
        # once the app exists (the row is written before it is built).
        self.traffic: Callable[[], dict[str, Any]] | None = None
        deployments.insert(store, values)
        self._thread = threading.Thread(target=self._beat, name="keel-serve-heartbeat")
        self._thread.daemon = True
        self._thread.start()

    def _beat(self) -> None:
        from keel.store import deployments

        while not self._done.wait(deployments.HEARTBEAT_SECONDS):
            try:
                traffic = self.traffic() if self.traffic is not None else {}
                deployments.heartbeat(self.store, self.id, **traffic)
            except Exception as exc:
                log.warning("keel serve: heartbeat not recorded: %s", exc)

    def stop(self) -> None:
        from keel.store import deployments

        self._done.set()
        self._thread.join(timeout=10)
        try:
            deployments.mark_stopped(self.store, self.id)
        except Exception as exc:
            log.warning("keel serve: could not mark the deployment stopped: %s", exc)
