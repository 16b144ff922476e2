"""The one implementation of "follow an alias, load in the background, swap
atomically, report load errors", used by the model server and by the workflow
endpoints' `keel.load_model` cache (model_cache.py).

`ModelSlot` holds one `Served` (a loaded version) at a time. A request takes the
current one and keeps using it to the end, so a switch never changes a model under a
request in flight: switching is one reference assignment, made only after the new
version loaded completely in the background.

For `models:/NAME@ALIAS` (and `models:/NAME/latest`) the alias is looked at with one
small query: by a thread every `poll_seconds` (the model server), or, with
`poll_seconds=0`, when a caller asks `check_soon(interval)` and the last look is older
than the interval (the cache: one look in a background thread, so no request waits).
When it names another version, that version is loaded in that thread; a version
that fails to load is logged and reported (`/health`, the deployment's record,
the cache's `status()`) and not tried again until the alias moves again, while the
loaded one keeps serving. An unreachable store is the same: keep
serving, try again on the next poll. Pinned URIs (`models:/NAME/3`, `runs:/...`)
never move.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.store.metadata import MetadataStore
from keel.tracking.models import LoadedModel, load_source, parse_models_uri, source_from_runs_uri

log = logging.getLogger("keel.serving")

# How a registered version (tag) or a model object (attribute) says "call me once per
# request": its predict cannot take the rows of several requests at once.
BATCHABLE_TAG = "keel.batchable"
BATCHABLE_ATTR = "batchable"


@dataclass(frozen=True)
class Served:
    """One loaded version: what requests use until the next switch."""

    model: LoadedModel
    name: str | None  # the registered model's name (None for runs:/ URIs)
    version: int | None
    batchable: bool

    def predict(self, data: Any) -> Any:
        """The live model's predict, on data already checked against the signature."""
        raw = self.model.unwrap()
        method = getattr(raw, "predict", None)
        return (method or raw)(data)


def _falsy(value: Any) -> bool:
    return str(value).strip().lower() in ("0", "false", "no", "off")


class ModelSlot:
    def __init__(
        self,
        store: MetadataStore,
        uri: str,
        *,
        poll_seconds: float = 1.0,
        on_change: Callable[[ModelSlot], None] | None = None,
        loader: Callable[[str], LoadedModel] | None = None,
    ) -> None:
        self.store = store
        self.uri = uri.strip()
        self.poll_seconds = poll_seconds
        self.on_change = on_change
        # Loads a pinned URI; None reads it from `store` (the cache passes the
        # uncached `load_model`, whose store is the registry's).
        self.loader = loader
        self.name: str | None = None
        self.ref: str | None = None  # "@alias", "latest" or a number
        if self.uri.startswith("models:/"):
            self.name, self.ref = parse_models_uri(self.uri)
        self.current: Served | None = None
        self.state = "loading"  # loading | serving | failed
        self.last_error: str | None = None
        self.failed_version: int | None = None
        self.reloads = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checked_at = 0.0  # monotonic time of the last look at the alias
        self._checking = False  # a check_soon() look is under way
        self._check_lock = threading.Lock()

    @property
    def follows(self) -> bool:
        """Whether the URI can move: an alias or `latest`."""
        return self.ref is not None and not self.ref.isdigit()

    # -- resolving and loading --------------------------------------------------------
    def resolve(self) -> int | None:
        """The version the URI names now (None for runs:/ URIs)."""
        from keel.tracking.registry import version_number

        if self.name is None:
            return None
        return version_number(self.store, self.name, self.ref)

    def load(self, version: int | None) -> Served:
        from keel.store import registry_store
        from keel.tracking import registry

        uri = self.uri if version is None else f"models:/{self.name}/{version}"
        if self.loader is not None:
            model = self.loader(uri)
        elif self.name is None:
            model = load_source(self.store, source_from_runs_uri(self.store, self.uri), uri)
        else:
            assert version is not None
            source = registry.version_source(self.store, self.name, version)
            model = load_source(self.store, source, uri)
        tags: dict[str, str] = {}
        if self.name is not None and version is not None:
            row = registry_store.get_version(self.store, self.name, version)
            tags = registry.model_version_of(self.store, row).tags if row is not None else {}
        batchable = not _falsy(tags.get(BATCHABLE_TAG, "true")) and bool(
            getattr(model.unwrap(), BATCHABLE_ATTR, True)
        )
        return Served(model=model, name=self.name, version=version, batchable=batchable)

    def start(self) -> Served:
        """Load what the URI names now (errors propagate: the server must not start),
        then follow the alias in the background."""
        served = self.load(self.resolve())
        self._checked_at = time.monotonic()
        self._switch(served)
        if self.follows and self.poll_seconds > 0:
            self._thread = threading.Thread(target=self._follow, name="keel-serve-reload")
            self._thread.daemon = True
            self._thread.start()
        return served

    def _switch(self, served: Served) -> None:
        previous = self.current
        self.current = served  # one assignment: requests hold their own reference
        self.state = "serving"
        self.last_error = None
        self.failed_version = None
        if previous is not None:
            self.reloads += 1
            log.warning(
                "keel serve: %s now serves version %s (was %s)",
                self.uri,
                served.version,
                previous.version,
            )
        self.report()

    def report(self) -> None:
        """Tell `on_change` (the deployment record) the current state."""
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception as exc:  # a report must never stop serving
                log.warning("keel serve: could not record the change: %s", exc)

    # -- following the alias ----------------------------------------------------------
    def poll_once(self) -> None:
        """One look at the alias; loads and switches when it moved."""
        try:
            version = self.resolve()
        except Exception as exc:
            self._failed(None, f"cannot resolve {self.uri}: {type(exc).__name__}: {exc}")
            return
        if self.last_error is not None and self.failed_version is None:
            self.last_error = None  # the store answers again
            self.report()
        current = self.current.version if self.current is not None else None
        if version == current and self.failed_version is not None:
            self.last_error = None  # the alias left the version that failed
            self.failed_version = None
            self.report()
        if version == current or version == self.failed_version:
            return
        try:
            served = self.load(version)
        except Exception as exc:
            target = f"models:/{self.name}/{version}"
            self._failed(
                version, f"cannot load {target} (for {self.uri}): {type(exc).__name__}: {exc}"
            )
            return
        self._switch(served)

    def _failed(self, version: int | None, message: str) -> None:
        first = message != self.last_error
        self.last_error = message
        if version is not None:
            self.failed_version = version
        if first:
            log.error("keel serve: %s; still serving version %s", message, self.version)
            self.report()

    def check_soon(self, interval: float) -> None:
        """Look at the alias in a background thread if the last look is older than
        `interval` seconds and none is under way; returns at once either way."""
        if not self.follows or time.monotonic() - self._checked_at < interval:
            return
        with self._check_lock:
            if self._checking or time.monotonic() - self._checked_at < interval:
                return
            self._checking = True
        threading.Thread(
            target=self._check, name=f"keel-model-reload-{self.name}", daemon=True
        ).start()

    def _check(self) -> None:
        try:
            self.poll_once()
        finally:
            self._checked_at = time.monotonic()
            self._checking = False

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def version(self) -> int | None:
        return self.current.version if self.current is not None else None
