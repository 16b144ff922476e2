"""Registered versions are immutable: their files are pinned by content hash.

At registration, the model's files are copied into the artifact store's pinned area
(each checked on the way against the hash it was recorded with), and their sha256s
are kept in the version's `meta["pinned"]`, `{path: sha256}`. A registered version
is then loaded only from those copies, each checked against its sha256 before
anything is deserialized: overwriting a run's files afterwards, over HTTP or on
disk, changes nothing a registered version loads, and a pinned copy changed on disk
raises `ArtifactIntegrityError` instead of being unpickled.

Versions registered before keel pinned (no "pinned" in their meta) still load from
their recorded hashes; for keel's own flavors the bytes are checked against the
hash first, so a changed blob is refused there too. An MLflow version whose files
keel does not hold (e.g. `s3://...`) cannot be pinned and is registered as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from keel.errors import ArtifactIntegrityError, ModelRegistryError
from keel.store.artifacts import artifact_store

if TYPE_CHECKING:
    from keel.store.metadata import MetadataStore
    from keel.tracking.models import ModelSource

PINNED = "pinned"


def pinned_files(meta: dict[str, Any]) -> dict[str, str] | None:
    """A version's pinned files, {path: sha256}; None for a version without pins."""
    found = meta.get(PINNED)
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else None


def model_file(meta: dict[str, Any]) -> str:
    """The name of the model's file in keel's own flavors (as MLflow is shown it)."""
    return str(meta.get("file") or "model.bin")


def _salt(meta: dict[str, Any]) -> bytes:
    """What a model's recorded hash covers before its bytes: a step's output is
    hashed with its serializer's name (keel.store.values.content_digest)."""
    if meta.get("format") == "step-output":
        return str(meta.get("serializer") or "").encode() + b"\0"
    return b""


def pin_source(store: MetadataStore, source: ModelSource) -> ModelSource:
    """`source` with its files pinned and their sha256s in its meta."""
    artifacts = artifact_store(store.config.artifacts_url)
    already = pinned_files(source.meta)
    if already is not None:  # registered again from a pinned version: check, then share
        for sha in already.values():
            artifacts.verify_pinned(sha)
        return source
    if source.flavor == "mlflow":
        pinned = pin_mlflow_files(store, source.meta, source.run_id, source.seq)
        if pinned is None:
            return source
    else:
        sha = artifacts.pin(source.source_hash, salt=_salt(source.meta))
        pinned = {model_file(source.meta): sha}
    return replace(source, meta={**source.meta, PINNED: pinned})


def pin_mlflow_files(
    store: MetadataStore, meta: dict[str, Any], run_id: str | None, seq: int | None
) -> dict[str, str] | None:
    """Pin the files of an MLflow model directory that keel holds (a logged model, or
    a folder of a run's artifacts); None when its source is elsewhere."""
    from keel.tracking.mlflow_models import keel_held_files

    files = keel_held_files(store, meta, run_id, seq)
    if files is None:
        return None
    artifacts = artifact_store(store.config.artifacts_url)
    return {rel: artifacts.pin(digest) for rel, digest in sorted(files.items())}


def model_bytes(store: MetadataStore, source: ModelSource) -> bytes:
    """The bytes of a model in one of keel's flavors, checked before anyone loads them:
    from its pinned copy when it has one, else by its recorded hash."""
    artifacts = artifact_store(store.config.artifacts_url)
    pinned = pinned_files(source.meta)
    if pinned is not None:
        sha = pinned.get(model_file(source.meta))
        if sha is None:
            raise ModelRegistryError(
                f"the pinned files of {source.uri or 'this model'} do not include its model file",
                hint="Register the model again",
            )
        return artifacts.get(sha, pinned=True)
    data = artifacts.get(source.source_hash)
    if hashlib.sha256(_salt(source.meta) + data).hexdigest() != source.source_hash:
        raise ArtifactIntegrityError(
            f"the model's file {source.source_hash} in {artifacts.url} does not hold the "
            "bytes it was recorded with: it was changed on disk, and keel will not load it",
            run_id=source.run_id,
            hint="Restore the artifact store from a backup, or log and register the model again",
        )
    return data
