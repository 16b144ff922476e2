"""A recorded value: serialized, hashed, and kept inline or in the artifact store."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.store.artifacts import artifact_store
from keel.store.serializers import decode, encode


@dataclass(frozen=True, slots=True)
class StoredValue:
    serializer: str
    digest: str  # sha256 of serializer name and bytes: the value's content identity
    size: int
    type_name: str
    inline: bytes | None  # the bytes, when small enough to live in the metadata row
    ref: str | None  # else the artifact digest (equal to `digest`)

    def load(self, artifacts_url: str) -> Any:
        data = self.inline if self.inline is not None else self.read_bytes(artifacts_url)
        return decode(self.serializer, data)

    def read_bytes(self, artifacts_url: str) -> bytes:
        if self.inline is not None:
            return self.inline
        assert self.ref is not None
        return artifact_store(artifacts_url).get(self.ref)


def content_digest(serializer: str, data: bytes) -> str:
    h = hashlib.sha256(serializer.encode())
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()


def store_value(
    value: Any,
    *,
    artifacts_url: str,
    inline_limit: int,
    describe: Callable[[], str] = lambda: "value",
) -> StoredValue:
    """Serialize `value`; write it to the artifact store when it is too big to inline."""
    enc = encode(value, describe=describe)
    digest = content_digest(enc.serializer, enc.data)
    if len(enc.data) <= inline_limit:
        return StoredValue(enc.serializer, digest, len(enc.data), enc.type_name, enc.data, None)
    artifact_store(artifacts_url).put(digest, enc.data)
    return StoredValue(enc.serializer, digest, len(enc.data), enc.type_name, None, digest)
