"""Models loaded by served code, kept per process and following their alias.

A served workflow's task may call `keel.load_model("models:/digits@champion")` on
every request. Once `install()` has run, `load_model` answers from this cache: the
first call loads the model, later calls return the same object. Each URI is held by a
`ModelSlot` (model_slot.py, the model server's own): a URI that floats (`@alias`,
`/latest`) is re-resolved at most every `check_interval` seconds, by one background
look started by a request that does not wait for it; a new version replaces the old
one only once it loaded, so requests never see a half-loaded model. A reload that
fails (the store unreachable, a version that cannot load here) is logged and kept in
`status()`; the loaded version keeps serving. Pinned URIs (`models:/digits/3`,
`runs:/...`) never move and are never re-checked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keel.serving.model_slot import ModelSlot

if TYPE_CHECKING:
    from keel.tracking.models import LoadedModel

log = logging.getLogger("keel.serving")

DEFAULT_CHECK_INTERVAL = 2.0

Loader = Callable[[str], "LoadedModel"]


def _store() -> Any:
    from keel.tracking.registry import registry_store

    return registry_store()


class ModelCache:
    """Loaded models by (store, URI); see the module's docstring."""

    def __init__(self, check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.check_interval = check_interval
        self._slots: dict[tuple[str, str], ModelSlot] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def get(self, uri: str, load: Loader) -> LoadedModel:
        store = _store()
        key = (store.url, uri)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._first_load(key, store, uri, load)
        else:
            slot.check_soon(self.check_interval)
        served = slot.current
        assert served is not None  # a slot is kept only once it loaded
        return served.model

    def _first_load(self, key: tuple[str, str], store: Any, uri: str, load: Loader) -> ModelSlot:
        # One loader per URI: concurrent first requests wait for it instead of each
        # loading the same model. Its errors reach the caller, as load_model's would.
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            found = self._slots.get(key)
            if found is not None:
                return found
            slot = ModelSlot(store, uri, poll_seconds=0, loader=load)
            slot.start()
            self._slots[key] = slot
            return slot

    def status(self) -> list[dict[str, Any]]:
        """What is loaded: URI, version, and the last reload error (for /health)."""
        return [
            {"uri": s.uri, "version": s.version, "error": s.last_error}
            for s in list(self._slots.values())
        ]

    def clear(self) -> None:
        with self._lock:
            self._slots.clear()
            self._loading.clear()


_shared: ModelCache | None = None
_shared_lock = threading.Lock()


def shared() -> ModelCache:
    """The process's cache (made on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ModelCache()
        return _shared


_installed = 0


def install(check_interval: float | None = None) -> ModelCache:
    """Make `keel.load_model` answer from the process's cache until as many
    `uninstall()` calls (a serving app installs it while it runs); returns the cache."""
    global _installed
    from keel.tracking.models import set_load_hook

    cache = shared()
    if check_interval is not None:
        cache.check_interval = check_interval
    with _shared_lock:
        _installed += 1
        set_load_hook(cache.get)
    return cache


def uninstall() -> None:
    """Undo one `install()`; the last one makes `keel.load_model` load every time again."""
    global _installed
    from keel.tracking.models import set_load_hook

    with _shared_lock:
        _installed = max(0, _installed - 1)
        if _installed == 0:
            set_load_hook(None)
