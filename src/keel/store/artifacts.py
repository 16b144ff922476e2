"""The artifact store: immutable blobs named by the sha256 of their content.

A local folder is used directly (fast path); any other location goes through
fsspec, e.g. `s3://bucket/keel` or `memory://keel`.

Blobs live at `XX/DIGEST`. The files of registered model versions are also copied
into `pinned/XX/SHA256` (named by the plain sha256 of their bytes), apart from the
runs' blobs, so nothing done later to a run's files reaches a registered version;
reading a pinned file always checks its bytes against its name.

A local write goes to a temporary file in the target folder, is fsynced, then
renamed into place: a crash never leaves a half-written blob under a digest, and a
failed write (a full disk) removes its temporary file before raising.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from keel.errors import ArtifactIntegrityError, ArtifactWriteError, ConfigError, SerializationError

CHUNK = 1 << 20  # how much of a blob is read or written at a time
PINNED = "pinned"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _rel(digest: str, pinned: bool = False) -> str:
    return f"{PINNED + '/' if pinned else ''}{digest[:2]}/{digest}"


def read_chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(CHUNK):
        yield chunk


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
        return f"{self.url.rstrip('/')}/{_rel(digest)}"

    def _path(self, rel: str) -> str:
        """Where `rel` is: a local path, or a path of the fsspec filesystem."""
        if self._local is not None:
            return str(self._local / rel)
        return f"{self._root.rstrip('/')}/{rel}"

    def _exists(self, rel: str) -> bool:
        if self._local is not None:
            return (self._local / rel).exists()
        return bool(self._fs.exists(self._path(rel)))

    # -- writing ---------------------------------------------------------------------------

    def put(self, digest: str, data: bytes) -> str:
        """Store `data` under its digest; a blob already there is left alone."""
        rel = _rel(digest)
        if not self._exists(rel):
            self._write(rel, [data])
        return self._path(rel) if self._local is not None else self.uri(digest)

    def _write(self, rel: str, chunks: Iterable[bytes]) -> None:
        """Write `chunks` to `rel` whole or not at all. An exception raised while the
        chunks are produced (e.g. a failed content check) removes what was written."""
        if self._local is None:
            self._write_fsspec(rel, chunks)
            return
        target = self._local / rel
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                # Durable before it has its name: after a power cut a blob is whole or absent.
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            tmp = None
            _fsync_dir(target.parent)
        except OSError as exc:
            raise self._write_failed(exc) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def _write_fsspec(self, rel: str, chunks: Iterable[bytes]) -> None:
        # Object stores make a file visible only once it is complete; remove any part of
        # it a failure left behind on filesystems that do not.
        path = self._path(rel)
        try:
            self._fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            with self._fs.open(path, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if self._fs.exists(path):
                    self._fs.rm(path)
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise self._write_failed(exc) from exc
            raise

    def _write_failed(self, exc: OSError) -> ArtifactWriteError:
        why = exc.strerror or str(exc) or type(exc).__name__
        # The fix is in the message itself: a step's recorded error keeps only the message.
        return ArtifactWriteError(
            f"cannot write to the artifact store {self.url}: {why}; free space (or fix the "
            "store), then continue the run with `keel resume RUN_ID`",
            hint="This is the environment, not your code (a full disk, a read-only or "
            "unreachable store); what the run recorded is kept",
        )

    # -- reading ---------------------------------------------------------------------------

    def open(self, digest: str, *, pinned: bool = False) -> IO[bytes]:
        """The blob as a binary file object, for reading it in chunks."""
        rel = _rel(digest, pinned)
        try:
            if self._local is not None:
                return (self._local / rel).open("rb")
            return self._fs.open(self._path(rel), "rb")  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise self._missing(digest) from None

    def size(self, digest: str, *, pinned: bool = False) -> int:
        """The size in bytes of a stored blob, without reading it."""
        rel = _rel(digest, pinned)
        try:
            if self._local is not None:
                return (self._local / rel).stat().st_size
            return int(self._fs.size(self._path(rel)))
        except FileNotFoundError:
            raise self._missing(digest) from None

    def get(self, digest: str, *, pinned: bool = False) -> bytes:
        """A blob's bytes; a pinned one only if they still hash to its name."""
        with self.open(digest, pinned=pinned) as fh:
            data = fh.read()
        if pinned and hashlib.sha256(data).hexdigest() != digest:
            raise self._tampered(digest)
        return data

    def verify_pinned(self, digest: str) -> int:
        """Check, in chunks, that a pinned file still holds its bytes; its size."""
        hasher, size = hashlib.sha256(), 0
        with self.open(digest, pinned=True) as fh:
            for chunk in read_chunks(fh):
                hasher.update(chunk)
                size += len(chunk)
        if hasher.hexdigest() != digest:
            raise self._tampered(digest)
        return size

    # -- pinning ---------------------------------------------------------------------------

    def pin(self, digest: str, *, salt: bytes = b"") -> str:
        """Copy blob `digest` into the pinned area; the sha256 of its bytes, its name there.

        The copy is checked on the way: sha256(salt + bytes) must still be `digest` (the
        identity it was recorded with; a step's output is salted with its serializer), so
        a blob changed on disk since it was recorded is refused, not pinned. A pinned
        file already there is replaced by the checked copy, which also mends one that was
        tampered with.
        """
        identity = hashlib.sha256(salt)
        plain = hashlib.sha256()
        tmp = f"{PINNED}/.tmp-{uuid.uuid4().hex}"

        def checked() -> Iterator[bytes]:
            with self.open(digest) as fh:
                for chunk in read_chunks(fh):
                    identity.update(chunk)
                    plain.update(chunk)
                    yield chunk
            if identity.hexdigest() != digest:
                raise ArtifactIntegrityError(
                    f"artifact {digest} in {self.url} no longer holds the bytes it was "
                    "recorded with (it was changed after it was written), so it was not "
                    "registered",
                    hint="Find out who changed the artifact store's files; register a "
                    "model from an intact run",
                )

        self._write(tmp, checked())
        sha = plain.hexdigest()
        self._rename(tmp, _rel(sha, pinned=True))
        return sha

    def _rename(self, src: str, dst: str) -> None:
        try:
            if self._local is not None:
                target = self._local / dst
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._local / src, target)
                _fsync_dir(target.parent)
            else:
                self._fs.makedirs(self._path(dst).rsplit("/", 1)[0], exist_ok=True)
                self._fs.mv(self._path(src), self._path(dst))
        except OSError as exc:
            with contextlib.suppress(OSError, FileNotFoundError):
                if self._local is not None:
                    os.unlink(self._local / src)
                else:
                    self._fs.rm(self._path(src))
            raise self._write_failed(exc) from exc

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store bytes that come in chunks (a large file) under their sha256, without
        holding them in memory; (digest, size)."""
        hasher, size = hashlib.sha256(), 0

        def counted() -> Iterator[bytes]:
            nonlocal size
            for chunk in chunks:
                hasher.update(chunk)
                size += len(chunk)
                yield chunk

        tmp = f".tmp-{uuid.uuid4().hex}"
        self._write(tmp, counted())
        digest = hasher.hexdigest()
        self._rename(tmp, _rel(digest))
        return digest, size

    # -- errors ----------------------------------------------------------------------------

    def _missing(self, digest: str) -> SerializationError:
        return SerializationError(
            f"artifact {digest} is missing from the artifact store {self.url}",
            hint="The store was moved or pruned; point KEEL_ARTIFACTS at the right place",
        )

    def _tampered(self, digest: str) -> ArtifactIntegrityError:
        return ArtifactIntegrityError(
            f"the pinned file {digest} in {self.url} does not hold the bytes it was pinned "
            "with: it was changed on disk, and keel will not load it",
            hint="Restore the artifact store from a backup, or register the model again "
            "from an intact source",
        )


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_stores: dict[str, ArtifactStore] = {}


def artifact_store(url: str) -> ArtifactStore:
    """One ArtifactStore per URL per process (workers in other processes open their own)."""
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = ArtifactStore(url)
    return store
