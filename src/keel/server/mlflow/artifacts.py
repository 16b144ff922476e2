"""The `mlflow-artifacts` proxy: upload (PUT bytes), download (GET), list, delete.

Paths are `{experiment}/{run_id}/artifacts/{file}` for a run's artifacts and
`{experiment}/models/{model_id}/artifacts/{file}` for a logged model's files. The
bytes go to keel's artifact store under their sha256 (so no path from a request
ever names a file on disk), and the path -> hash rows to keel_logged_artifacts (runs,
so keel shows them like keel.log_artifact's) or keel_logged_model_files (models).
`keel-models/{name}/{version}/{file}` presents a registered version's pinned files as
an MLflow model directory (read-only; see keel.tracking.mlflow_models and
keel.tracking.pins). Downloads are streamed. A finished run's files, and a READY
logged model's, can be changed only by an admin (409 for others).
"""

from __future__ import annotations

import hashlib
import mimetypes
import posixpath
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, BinaryIO, NamedTuple

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from keel.server.auth import Principal
from keel.server.downloads import blob_response
from keel.server.mlflow.common import (
    Args,
    MlflowError,
    MlflowRoute,
    Operator,
    Store,
    Viewer,
    invalid,
    not_found,
    reply,
    stored_id,
    text_arg,
)
from keel.server.mlflow.data import writable
from keel.server.mlflow.mapping import Tracked, find
from keel.status import FINISHED_RUN
from keel.store import registry_store as rs
from keel.store.artifacts import artifact_store
from keel.store.metadata import Batch, MetadataStore
from keel.store.schema import logged_artifacts, logged_model_files, logged_models
from keel.tracking.mlflow_models import mlflow_model_files

router = APIRouter(route_class=MlflowRoute)
info_router = APIRouter(route_class=MlflowRoute)
_MAX_PATH = 1000
_CHUNK = 1024 * 1024  # bytes per read when an upload moves to the artifact store
KEEL_MODELS = "keel-models"  # the root under which keel's own versions are presented


@dataclass(frozen=True, slots=True)
class Target:
    """Whose artifacts a path names (a run or a logged model) and the path inside."""

    run: Tracked | None
    model_id: str | None
    rel: str
    version: Any = None  # the registry row of a version keel registered


def clean(parts: list[str]) -> str:
    for part in parts:
        if part in ("", ".", "..") or "\\" in part or "\x00" in part:
            raise invalid("artifact paths must be relative and may not contain '.' or '..' parts")
    rel = "/".join(parts)
    if len(rel) > _MAX_PATH:
        raise invalid(f"artifact paths may have at most {_MAX_PATH} characters")
    return rel


def target(store: MetadataStore, path: str) -> Target:
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[0] == KEEL_MODELS:
        return Target(None, None, clean(parts[3:]), keel_version(store, parts[1], parts[2]))
    if len(parts) >= 4 and parts[1] == "models" and parts[3] == "artifacts":
        model_id = parts[2]
        with store.engine.connect() as conn:
            found = conn.execute(
                sa.select(logged_models.c.model_id).where(logged_models.c.model_id == model_id)
            ).first()
        if found is None:
            raise not_found(f"Logged model with ID '{model_id}' not found.")
        return Target(None, model_id, clean(parts[4:]))
    if len(parts) >= 3 and parts[2] == "artifacts":
        return Target(find(store, parts[1]), None, clean(parts[3:]))
    raise not_found(
        f"no artifacts at {path!r}: use {{experiment}}/{{run_id}}/artifacts/... "
        "or {experiment}/models/{model_id}/artifacts/..."
    )


def keel_version(store: MetadataStore, name: str, number: str) -> Any:
    version = stored_id(number)  # "2", never "²" (a digit int() refuses) or 2**70
    row = rs.get_version(store, name, version) if version is not None else None
    if row is None:
        raise not_found(f"Model version (name={name}, version={number}) not found")
    if mlflow_model_files(row) is None or not (row.source_hash or row.flavor == "mlflow"):
        raise not_found(
            f"version {number} of {name!r} has no pinned model files here: its files are at "
            "the URI model-versions/get-download-uri answers"
        )
    return row


class Entry(NamedTuple):
    """A file of a run, a logged model or a version: its blob, size, and whether it is
    a pinned copy (a registered version's)."""

    digest: str
    size: int
    pinned: bool = False


def _version_files(store: MetadataStore, row: Any) -> dict[str, Entry]:
    artifacts = artifact_store(store.config.artifacts_url)
    out = {}
    for path, content in (mlflow_model_files(row) or {}).items():
        if isinstance(content, bytes):
            digest = hashlib.sha256(content).hexdigest()
            artifacts.put(digest, content)
            out[path] = Entry(digest, len(content))
        else:
            size = artifacts.size(content.digest, pinned=content.pinned)
            out[path] = Entry(content.digest, size, content.pinned)
    return out


def _files(store: MetadataStore, where: Target) -> dict[str, Entry]:
    """path -> where and how big every file of the run, model or version is."""
    if where.version is not None:
        return _version_files(store, where.version)
    if where.run is not None:
        t = where.run
        stmt = sa.select(logged_artifacts.c.path, logged_artifacts.c.hash, logged_artifacts.c.size)
        stmt = stmt.where(logged_artifacts.c.run_id == t.run_id, logged_artifacts.c.seq == t.seq)
    else:
        table = logged_model_files
        stmt = sa.select(table.c.path, table.c.hash, table.c.size).where(
            table.c.model_id == where.model_id
        )
    with store.engine.connect() as conn:
        return {r.path: Entry(r.hash, r.size) for r in conn.execute(stmt)}


def _list(store: MetadataStore, path: str) -> Response:
    where = target(store, path)
    files = _files(store, where)
    if where.rel in files:
        name = posixpath.basename(where.rel)
        size = files[where.rel].size
        return reply({"files": [{"path": name, "is_dir": False, "file_size": size}]})
    prefix = where.rel + "/" if where.rel else ""
    entries: dict[str, dict[str, Any]] = {}
    for file, (_, size, _pinned) in files.items():
        if not file.startswith(prefix):
            continue
        head, sep, _rest = file[len(prefix) :].partition("/")
        if sep:
            entries[head] = {"path": head, "is_dir": True}
        else:
            entries[head] = {"path": head, "is_dir": False, "file_size": size}
    if not entries:
        return reply({})
    return reply({"files": [entries[k] for k in sorted(entries)]})


@router.get("/artifacts")
def list_artifacts(args: Args, store: Store, _: Viewer) -> Response:
    return _list(store, text_arg(args, "path", required=False))


def _download(store: MetadataStore, path: str) -> Response:
    where = target(store, path)
    found = _files(store, where).get(where.rel)
    if found is None:
        raise not_found(f"Artifact '{where.rel}' does not exist at {path!r}")
    kind = mimetypes.guess_type(where.rel)[0] or "application/octet-stream"
    return blob_response(store, found.digest, kind, pinned=found.pinned)


@router.get("/artifacts/{path:path}")
def download(path: str, store: Store, _: Viewer) -> Response:
    return _download(store, path)


_FINISHED = frozenset(FINISHED_RUN | {"CACHED", "SKIPPED"})


def _unchanged_once_finished(store: MetadataStore, where: Target, principal: Principal) -> None:
    """A finished run's files, and a logged model's once it is READY, may be written
    only by an admin: what a run produced stays what it produced (409 otherwise)."""
    if principal.allows("admin"):
        return
    if where.run is not None and where.run.status in _FINISHED:
        raise MlflowError(
            "RESOURCE_CONFLICT",
            f"run {where.run.mlflow_id} has finished ({where.run.status}); its artifacts "
            "can no longer be changed (only an admin may)",
        )
    if where.model_id is not None:
        with store.engine.connect() as conn:
            status = conn.execute(
                sa.select(logged_models.c.status).where(logged_models.c.model_id == where.model_id)
            ).scalar()
        if status == "LOGGED_MODEL_READY":
            raise MlflowError(
                "RESOURCE_CONFLICT",
                f"logged model {where.model_id} is READY; its files can no longer be changed "
                "(only an admin may): log a new model instead",
            )


def _read_only(where: Target) -> None:
    if where.version is not None:
        raise invalid(
            f"the files of {where.version.name!r} version {where.version.version} are "
            "read-only: register a new version to change the model"
        )


def _upload_target(store: MetadataStore, path: str, principal: Principal) -> Target:
    """Where an upload goes, checked before its bytes are read."""
    where = target(store, path)
    _read_only(where)
    _unchanged_once_finished(store, where, principal)
    if not where.rel:
        raise invalid("an upload needs a file path after .../artifacts/")
    if where.run is not None:
        writable(store, where.run.mlflow_id)
    return where


def _save(store: MetadataStore, where: Target, spool: BinaryIO) -> None:
    """Stream the spooled bytes into the artifact store and record the path."""
    spool.seek(0)
    blobs = artifact_store(store.config.artifacts_url)
    digest, size = blobs.put_stream(iter(partial(spool.read, _CHUNK), b""))
    now = time.time()
    if where.run is not None:
        t = writable(store, where.run.mlflow_id)
        batch = Batch()
        batch.logged_artifacts = [(t.run_id, t.seq, where.rel, digest, size, "file", now)]
        store.write_batch(batch)
        return
    table = logged_model_files
    with store.engine.begin() as conn:
        conn.execute(
            table.delete().where(table.c.model_id == where.model_id, table.c.path == where.rel)
        )
        conn.execute(
            table.insert().values(
                model_id=where.model_id, path=where.rel, hash=digest, size=size, created_at=now
            )
        )


@router.put("/artifacts/{path:path}")
async def upload(path: str, request: Request, store: Store, principal: Operator) -> Response:
    """The body streams to a temporary file, then from it to the artifact store, never
    whole into memory; the guard caps its size (KEEL_SERVER_MAX_UPLOAD)."""
    where = await run_in_threadpool(_upload_target, store, path, principal)
    with tempfile.TemporaryFile() as spool:
        async for chunk in request.stream():
            spool.write(chunk)
        await run_in_threadpool(_save, store, where, spool)
    return reply({})


def _delete(store: MetadataStore, path: str, principal: Principal) -> Response:
    where = target(store, path)
    _read_only(where)
    _unchanged_once_finished(store, where, principal)
    prefix = where.rel + "/"
    gone = [
        p for p in _files(store, where) if not where.rel or p == where.rel or p.startswith(prefix)
    ]
    if not gone:
        raise not_found(f"Artifact '{where.rel}' does not exist at {path!r}")
    with store.engine.begin() as conn:
        if where.run is not None:
            t = where.run
            conn.execute(
                logged_artifacts.delete().where(
                    logged_artifacts.c.run_id == t.run_id,
                    logged_artifacts.c.seq == t.seq,
                    logged_artifacts.c.path.in_(gone),
                )
            )
        else:
            conn.execute(
                logged_model_files.delete().where(
                    logged_model_files.c.model_id == where.model_id,
                    logged_model_files.c.path.in_(gone),
                )
            )
    return reply({})


@router.delete("/artifacts/{path:path}")
def delete(path: str, store: Store, principal: Operator) -> Response:
    return _delete(store, path, principal)


@info_router.get("/server-info")
def server_info(_: Viewer) -> Response:
    """What the client probes before transfers: no multipart uploads or downloads here."""
    return reply(
        {
            "store_type": "keel",
            "workspaces_enabled": False,
            "multipart_uploads_enabled": False,
            "multipart_downloads_enabled": False,
        }
    )
