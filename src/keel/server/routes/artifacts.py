"""Artifacts: step outputs and run results, files logged to a run, and blobs of the
artifact store by hash. Metadata, download and preview for each.

A download is looked up by what the metadata store recorded (a run and step, a
logged path, a sha256): a path in a request is never joined onto a folder, so it
cannot reach outside the artifact store. Pickled values are served as bytes and
never loaded here. Downloads are streamed from the artifact store in chunks.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel

from keel.errors import SerializationError
from keel.server.downloads import blob_response
from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Store, Viewer, find_step, get_run_row
from keel.server.routes.previews import (
    EXTENSIONS,
    MEDIA_TYPES,
    Preview,
    media_type_for_file,
    preview_file,
    preview_value,
)
from keel.store.artifacts import artifact_store
from keel.store.metadata import MetadataStore
from keel.store.schema import artifacts, logged_artifacts, model_versions

router = APIRouter(tags=["artifacts"], dependencies=AUTH, responses=ERRORS)

_DIGEST = re.compile(r"[0-9a-f]{64}")
# Downloads never render as a page of this site, whatever they contain.
_DOWNLOAD_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}
_BYTES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}
}


class ValueMeta(BaseModel):
    """A recorded value: a step's output or a run's result."""

    run_id: str
    step_key: str | None
    serializer: str
    type: str | None
    size: int | None
    hash: str | None
    stored: Literal["inline", "artifact"]
    content_url: str
    preview_url: str


class LoggedArtifactOut(BaseModel):
    run_id: str
    seq: int
    path: str
    hash: str
    size: int
    kind: str
    created_at: float
    content_url: str
    preview_url: str


class BlobOut(BaseModel):
    hash: str
    size: int
    what: Literal["value", "logged", "model"]
    serializer: str | None
    type: str | None
    run_id: str | None
    seq: int | None
    content_url: str


def _read_blob(store: MetadataStore, digest: str) -> bytes:
    try:
        return artifact_store(store.config.artifacts_url).get(digest)
    except SerializationError as exc:
        raise ApiError(404, "artifact_missing", exc.message, {"hint": exc.hint}) from None


def _headers(filename: str) -> dict[str, str]:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)[-150:] or "artifact"
    return {**_DOWNLOAD_HEADERS, "Content-Disposition": f'attachment; filename="{safe}"'}


def _download(store: MetadataStore, digest: str, media_type: str, filename: str) -> Response:
    """A blob as an attachment, streamed from the artifact store."""
    return blob_response(store, digest, media_type, _headers(filename))


# -- step outputs and run results --------------------------------------------------------


def _value_meta(run_id: str, step_key: str | None, row: Any, prefix: str, base: str) -> ValueMeta:
    serializer = getattr(row, f"{prefix}_serializer")
    if serializer is None:
        what = f"step {step_key}" if step_key else f"run {run_id}"
        raise ApiError(
            404,
            "not_found",
            f"{what} has no recorded {'output' if prefix == 'output' else 'result'}",
            {"status": row.status},
        )
    ref = getattr(row, f"{prefix}_ref")
    return ValueMeta(
        run_id=run_id,
        step_key=step_key,
        serializer=serializer,
        type=getattr(row, f"{prefix}_type"),
        size=getattr(row, "output_size", None) if prefix == "output" else None,
        hash=getattr(row, "output_hash", None) if prefix == "output" else ref,
        stored="artifact" if ref else "inline",
        content_url=f"{base}/content",
        preview_url=f"{base}/preview",
    )


def _value_download(store: MetadataStore, row: Any, prefix: str, meta: ValueMeta) -> Response:
    """A recorded value's bytes as an attachment: from the row when kept inline, else
    streamed from the artifact store."""
    what = f"{meta.run_id}-{meta.step_key if prefix == 'output' else 'result'}"
    name = what + EXTENSIONS.get(meta.serializer, ".bin")
    media_type = MEDIA_TYPES.get(meta.serializer, "application/octet-stream")
    inline = getattr(row, f"{prefix}_inline")
    if inline is not None:
        return Response(bytes(inline), media_type=media_type, headers=_headers(name))
    return _download(store, getattr(row, f"{prefix}_ref"), media_type, name)


def _value_bytes(store: MetadataStore, row: Any, prefix: str) -> bytes:
    inline = getattr(row, f"{prefix}_inline")
    if inline is not None:
        return bytes(inline)
    return _read_blob(store, getattr(row, f"{prefix}_ref"))


def _output(store: MetadataStore, run_id: str, step: str) -> tuple[Any, ValueMeta]:
    run = get_run_row(store, run_id)
    row = find_step(store, run.id, step)
    base = f"/api/v1/runs/{run.id}/steps/{row.key}/output"
    return row, _value_meta(run.id, row.key, row, "output", base)


def _result(store: MetadataStore, run_id: str) -> tuple[Any, ValueMeta]:
    run = get_run_row(store, run_id)
    return run, _value_meta(run.id, None, run, "result", f"/api/v1/runs/{run.id}/result")


@router.get("/runs/{run_id}/steps/{step}/output", response_model=ValueMeta)
def output_meta(run_id: str, step: str, _: Viewer, store: Store) -> ValueMeta:
    """What a step's recorded output is: serializer, type, size, content hash."""
    return _output(store, run_id, step)[1]


@router.get("/runs/{run_id}/steps/{step}/output/content", response_class=Response, responses=_BYTES)
def output_content(run_id: str, step: str, _: Viewer, store: Store) -> Response:
    """The output's bytes as its serializer wrote them (.json, .npy, .parquet, .pkl)."""
    row, meta = _output(store, run_id, step)
    return _value_download(store, row, "output", meta)


@router.get("/runs/{run_id}/steps/{step}/output/preview", response_model=Preview)
def output_preview(run_id: str, step: str, _: Viewer, store: Store) -> Preview:
    """A preview of the output: JSON, text, a table's head or an array's head."""
    row, meta = _output(store, run_id, step)
    return preview_value(meta.serializer, _value_bytes(store, row, "output"))


@router.get("/runs/{run_id}/result", response_model=ValueMeta)
def result_meta(run_id: str, _: Viewer, store: Store) -> ValueMeta:
    """What the run's return value is (recorded when the run succeeded)."""
    return _result(store, run_id)[1]


@router.get("/runs/{run_id}/result/content", response_class=Response, responses=_BYTES)
def result_content(run_id: str, _: Viewer, store: Store) -> Response:
    row, meta = _result(store, run_id)
    return _value_download(store, row, "result", meta)


@router.get("/runs/{run_id}/result/preview", response_model=Preview)
def result_preview(run_id: str, _: Viewer, store: Store) -> Preview:
    row, meta = _result(store, run_id)
    return preview_value(meta.serializer, _value_bytes(store, row, "result"))


# -- files logged to a run ----------------------------------------------------------------


def _seq(store: MetadataStore, run_id: str, step: str | None) -> int:
    return -1 if step is None else int(find_step(store, run_id, step).seq)


def _logged_out(row: Any) -> LoggedArtifactOut:
    from urllib.parse import quote

    query = f"path={quote(row.path, safe='')}" + (f"&step={row.seq}" if row.seq >= 0 else "")
    base = f"/api/v1/runs/{row.run_id}/artifacts"
    return LoggedArtifactOut(
        run_id=row.run_id,
        seq=row.seq,
        path=row.path,
        hash=row.hash,
        size=row.size,
        kind=row.kind,
        created_at=row.created_at,
        content_url=f"{base}/content?{query}",
        preview_url=f"{base}/preview?{query}",
    )


StepQuery = Annotated[
    str | None, Query(description="A step (key, seq or task name); the run itself if absent")
]
PathQuery = Annotated[str, Query(min_length=1, max_length=1000, description="The logged path")]


@router.get("/runs/{run_id}/artifacts", response_model=list[LoggedArtifactOut])
def list_logged(
    run_id: str, _: Viewer, store: Store, step: StepQuery = None, all_steps: bool = False
) -> list[LoggedArtifactOut]:
    """Files logged to the run (keel.log_artifact, log_text, log_dict, log_figure,
    log_table) or to one of its steps; `all_steps` lists the run's and every step's."""
    run = get_run_row(store, run_id)
    stmt = sa.select(logged_artifacts).where(logged_artifacts.c.run_id == run.id)
    if not all_steps:
        stmt = stmt.where(logged_artifacts.c.seq == _seq(store, run.id, step))
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.order_by(logged_artifacts.c.seq, logged_artifacts.c.path))
        return [_logged_out(r) for r in rows]


def _logged(store: MetadataStore, run_id: str, step: str | None, path: str) -> Any:
    run = get_run_row(store, run_id)
    seq = _seq(store, run.id, step)
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(logged_artifacts).where(
                logged_artifacts.c.run_id == run.id,
                logged_artifacts.c.seq == seq,
                logged_artifacts.c.path == path,
            )
        ).first()
    if row is None:
        raise ApiError(
            404,
            "not_found",
            f"no artifact {path[:200]!r} was logged to run {run.id}"
            + (f" step {step}" if step is not None else ""),
            {"hint": f"List them: GET /api/v1/runs/{run.id}/artifacts"},
        )
    return row


@router.get("/runs/{run_id}/artifacts/content", response_class=Response, responses=_BYTES)
def logged_content(
    run_id: str, path: PathQuery, _: Viewer, store: Store, step: StepQuery = None
) -> Response:
    """A logged file's bytes, by the path it was logged under."""
    row = _logged(store, run_id, step, path)
    return _download(store, row.hash, media_type_for_file(row.path), row.path.rsplit("/", 1)[-1])


@router.get("/runs/{run_id}/artifacts/preview", response_model=Preview)
def logged_preview(
    run_id: str, path: PathQuery, _: Viewer, store: Store, step: StepQuery = None
) -> Preview:
    """A preview of a logged file: image (base64), JSON, a table's head, or text."""
    row = _logged(store, run_id, step, path)
    return preview_file(row.path, _read_blob(store, row.hash))


# -- blobs by content hash ------------------------------------------------------------------

Digest = Annotated[str, Path(description="sha256 of the blob, 64 lowercase hex digits")]


def _check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ApiError(
            422,
            "invalid_request",
            "an artifact hash is 64 lowercase hexadecimal digits",
            {"hash": digest[:80]},
        )
    return digest


def _blob(store: MetadataStore, digest: str) -> BlobOut:
    url = f"/api/v1/artifacts/{digest}/content"
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(artifacts).where(artifacts.c.hash == digest)).first()
        if row is not None:
            return BlobOut(
                hash=digest, size=row.size, what="value", serializer=row.serializer,
                type=row.type_name, run_id=row.run_id, seq=row.seq, content_url=url,
            )  # fmt: skip
        logged = conn.execute(
            sa.select(logged_artifacts).where(logged_artifacts.c.hash == digest).limit(1)
        ).first()
        if logged is not None:
            return BlobOut(
                hash=digest, size=logged.size, what="logged", serializer=None, type=None,
                run_id=logged.run_id, seq=logged.seq, content_url=url,
            )  # fmt: skip
        model = conn.execute(
            sa.select(model_versions).where(model_versions.c.source_hash == digest).limit(1)
        ).first()
    if model is not None:
        try:
            size = artifact_store(store.config.artifacts_url).size(digest)
        except SerializationError as exc:
            raise ApiError(404, "artifact_missing", exc.message, {"hint": exc.hint}) from None
        return BlobOut(
            hash=digest, size=size, what="model", serializer=None, type=model.flavor,
            run_id=model.run_id, seq=model.seq, content_url=url,
        )  # fmt: skip
    raise ApiError(404, "not_found", f"no artifact with hash {digest} is recorded")


@router.get("/artifacts/{digest}", response_model=BlobOut)
def blob_meta(digest: Digest, _: Viewer, store: Store) -> BlobOut:
    """A blob of the artifact store that keel recorded: a large step output or run
    result, a logged file, or a registered model's bytes."""
    return _blob(store, _check_digest(digest))


@router.get("/artifacts/{digest}/content", response_class=Response, responses=_BYTES)
def blob_content(digest: Digest, _: Viewer, store: Store) -> Response:
    _blob(store, _check_digest(digest))
    return _download(store, digest, "application/octet-stream", digest)
