"""Models loaded by served code, kept per process and following their alias.

A served workflow's task may call `keel.load_model("models:/digits@champion")` on
every request. Once `install()` has run, `load_model` answers from this cache: the
first call loads the model, later calls return the same object. A URI that floats
(`@alias`, `/latest`) is re-resolved at most every `check_interval` seconds, by one
caller and one small query; when it names another version, that version loads on a
background thread and replaces the old one only once it is ready, so requests never
wait for a reload and never see a half-loaded model. A reload that fails (the store
unreachable, a version that cannot load here) is logged and kept in `status()`; the
loaded version keeps serving and the check runs again after the interval.
Pinned URIs (`models:/digits/3`, `runs:/...`) never move and are never re-checked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import qualified_name

if TYPE_CHECKING:
    from keel.tracking.models import LoadedModel

log = logging.getLogger("keel.serving")

DEFAULT_CHECK_INTERVAL = 2.0

Loader = Callable[[str], "LoadedModel"]


@dataclass
class _Entry:
    uri: str
    store_url: str
    floating: tuple[str, str] | None  # (name, alias or "latest") when the URI can move
    model: LoadedModel
    version: int | None
    checked_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    reloading: bool = False
    error: str | None = None


def _floating(uri: str) -> tuple[str, str] | None:
    if not uri.startswith("models:/"):
        return None
    from keel.tracking.models import parse_models_uri

    name, ref = parse_models_uri(uri)
    text = str(ref)
    return None if text.isdigit() else (name, text)


def _store() -> Any:
    from keel.tracking.registry import registry_store

    return registry_store()


def _resolve(store: Any, floating: tuple[str, str]) -> int:
    from keel.tracking.registry import version_number

    return version_number(store, *floating)


class ModelCache:
    """Loaded models by (store, URI); see the module's docstring."""

    def __init__(self, check_interval: float = DEFAULT_CHECK_INTERVAL) -> None:
        self.check_interval = check_interval
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str], threading.Lock] = {}

    def get(self, uri: str, load: Loader) -> LoadedModel:
        store = _store()
        key = (store.url, uri)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._first_load(key, store, uri, load)
        elif entry.floating is not None:
            self._maybe_check(entry, store, load)
        return entry.model

    def _first_load(self, key: tuple[str, str], store: Any, uri: str, load: Loader) -> _Entry:
        # One loader per URI: concurrent first requests wait for it instead of each
        # loading the same model.
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            found = self._entries.get(key)
            if found is not None:
                return found
            floating = _floating(uri)
            version = _resolve(store, floating) if floating else None
            target = f"models:/{floating[0]}/{version}" if floating else uri
            entry = _Entry(uri, store.url, floating, load(target), version, time.monotonic())
            self._entries[key] = entry
            return entry

    def _maybe_check(self, entry: _Entry, store: Any, load: Loader) -> None:
        if time.monotonic() - entry.checked_at < self.check_interval:
            return
        if not entry.lock.acquire(blocking=False):
            return  # another request is checking right now
        try:
            if entry.reloading or time.monotonic() - entry.checked_at < self.check_interval:
                return
            entry.checked_at = time.monotonic()
            assert entry.floating is not None
            try:
                version = _resolve(store, entry.floating)
            except Exception as exc:
                self._failed(entry, f"cannot check {entry.uri}", exc)
                return
            if version == entry.version:
                return
            entry.reloading = True
        finally:
            entry.lock.release()
        threading.Thread(
            target=self._reload,
            args=(entry, version, load),
            name=f"keel-model-reload-{entry.floating[0]}",
            daemon=True,
        ).start()

    def _reload(self, entry: _Entry, version: int, load: Loader) -> None:
        assert entry.floating is not None
        target = f"models:/{entry.floating[0]}/{version}"
        try:
            model = load(target)
        except Exception as exc:
            self._failed(entry, f"cannot load {target} (for {entry.uri})", exc)
        else:
            # One assignment swaps the model: a request holds whichever it read.
            entry.model, entry.version, entry.error = model, version, None
            log.info("%s now serves version %s", entry.uri, version)
        finally:
            entry.checked_at = time.monotonic()
            entry.reloading = False

    def _failed(self, entry: _Entry, what: str, exc: Exception) -> None:
        entry.error = f"{what}: {qualified_name(type(exc))}: {exc}"
        log.warning("%s; version %s keeps serving", entry.error, entry.version)

    def status(self) -> list[dict[str, Any]]:
        """What is loaded: URI, version, and the last reload error (for /health)."""
        return [
            {"uri": e.uri, "version": e.version, "error": e.error}
            for e in list(self._entries.values())
        ]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
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
