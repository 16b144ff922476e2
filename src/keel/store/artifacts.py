"""The artifact store: immutable blobs named by the sha256 of their content.

A local folder is used directly (fast path); any other location goes through
fsspec, e.g. `s3://bucket/keel` or `memory://keel`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from keel.errors import ConfigError, SerializationError


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class ArtifactStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._local: Path | None = None
        self._fs: Any = None
        if _is_local(url):
            self._local = Path(url.removeprefix("file://")).expanduser()
        else:
            try:
                import fsspec

                self._fs, self._root = fsspec.core.url_to_fs(url)
            except (ImportError, ValueError) as exc:
                raise ConfigError(
                    f"cannot open the artifact store {url!r}: {exc}",
                    hint="Check KEEL_ARTIFACTS; remote schemes need their fsspec package "
                    "(e.g. s3fs for s3://)",
                ) from None

    def uri(self, digest: str) -> str:
        return f"{self.url.rstrip('/')}/{digest[:2]}/{digest}"

    def put(self, digest: str, data: bytes) -> str:
        """Store `data` under its digest; a blob already there is left alone."""
        if self._local is not None:
            folder = self._local / digest[:2]
            target = folder / digest
            if not target.exists():
                folder.mkdir(parents=True, exist_ok=True)
                # Write then rename, so a crash never leaves a half-written blob.
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            return str(target)
        path = f"{self._root.rstrip('/')}/{digest[:2]}/{digest}"
        if not self._fs.exists(path):
            self._fs.makedirs(f"{self._root.rstrip('/')}/{digest[:2]}", exist_ok=True)
            self._fs.pipe_file(path, data)
        return self.uri(digest)

    def size(self, digest: str) -> int:
        """The size in bytes of a stored blob, without reading it."""
        try:
            if self._local is not None:
                return (self._local / digest[:2] / digest).stat().st_size
            return int(self._fs.size(f"{self._root.rstrip('/')}/{digest[:2]}/{digest}"))
        except FileNotFoundError:
            raise self._missing(digest) from None

    def get(self, digest: str) -> bytes:
        try:
            if self._local is not None:
                return (self._local / digest[:2] / digest).read_bytes()
            return bytes(self._fs.cat_file(f"{self._root.rstrip('/')}/{digest[:2]}/{digest}"))
        except FileNotFoundError:
            raise self._missing(digest) from None

    def _missing(self, digest: str) -> SerializationError:
        return SerializationError(
            f"artifact {digest} is missing from the artifact store {self.url}",
            hint="The store was moved or pruned; point KEEL_ARTIFACTS at the right place",
        )


_stores: dict[str, ArtifactStore] = {}


def artifact_store(url: str) -> ArtifactStore:
    """One ArtifactStore per URL per process (workers in other processes open their own)."""
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = ArtifactStore(url)
    return store
