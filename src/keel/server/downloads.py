"""Downloads from the artifact store, streamed: a file is sent in chunks as it is read,
so a large one never sits whole in the server's memory (four 256 MiB downloads at
once used to take the server past 2 GB). A pinned file (a registered version's) is
checked against its sha256 in a first pass before any of it is sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO

from fastapi.responses import StreamingResponse

from keel.errors import ArtifactIntegrityError, SerializationError
from keel.server.errors import ApiError
from keel.store.artifacts import artifact_store, read_chunks
from keel.store.metadata import MetadataStore


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    # Starlette iterates a sync generator on its thread pool; the file is closed when
    # the download ends, also when the client goes away midway.
    try:
        yield from read_chunks(fh)
    finally:
        fh.close()


def blob_response(
    store: MetadataStore,
    digest: str,
    media_type: str,
    headers: dict[str, str] | None = None,
    *,
    pinned: bool = False,
) -> StreamingResponse:
    """The blob (or pinned file) as a streamed reply with its Content-Length; 404 when
    it is missing, 409 when a pinned file no longer holds its bytes."""
    artifacts = artifact_store(store.config.artifacts_url)
    try:
        size = artifacts.verify_pinned(digest) if pinned else artifacts.size(digest)
        fh = artifacts.open(digest, pinned=pinned)
    except SerializationError as exc:
        raise ApiError(404, "artifact_missing", exc.message, {"hint": exc.hint}) from None
    except ArtifactIntegrityError as exc:
        raise ApiError(409, "artifact_changed", exc.message, {"hint": exc.hint}) from None
    return StreamingResponse(
        _chunks(fh),
        media_type=media_type,
        headers={**(headers or {}), "Content-Length": str(size)},
    )
