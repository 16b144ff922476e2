"""The inference log of a model version (`keel serve --log-requests`), newest first,
one entry per logged request, in pages (`next_cursor` back as `cursor`)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Store, Viewer, decode_cursor, encode_cursor
from keel.server.routes.models import Name, VersionRef, _number

router = APIRouter(tags=["models"], dependencies=AUTH, responses=ERRORS)


class InferenceOut(BaseModel):
    id: int
    version: int | None
    deployment_id: str | None
    time: float
    latency_ms: float
    status: int
    inputs: Any = Field(description='{"columns": [...], "data": [[...]]} for tabular input')
    predictions: Any
    truncated: bool = Field(description="Inputs or predictions over the size limit, left out")


class InferencePage(BaseModel):
    inferences: list[InferenceOut]
    next_cursor: str | None


@router.get("/models/{name}/versions/{version}/inferences", response_model=InferencePage)
def list_inferences(
    name: Name,
    version: VersionRef,
    _: Viewer,
    store: Store,
    since: Annotated[
        float | None, Query(ge=0, le=1e12, allow_inf_nan=False, description="Epoch seconds")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> InferencePage:
    """The version's logged requests, newest first."""
    from keel.store import inference_log

    number = _number(store, name, version)
    before = decode_cursor(cursor, (int,))[0] if cursor is not None else None
    if before is not None and not 0 <= before < 2**63:  # an id the database can compare
        raise ApiError(400, "bad_cursor", "the cursor is not one this server returned")
    rows = inference_log.select(
        store, name, number, since=since, limit=limit + 1, newest_first=True, before_id=before
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return InferencePage(
        inferences=[
            InferenceOut(
                id=r.id,
                version=r.version,
                deployment_id=r.deployment_id,
                time=r.time,
                latency_ms=r.latency_ms,
                status=r.status,
                inputs=json.loads(r.inputs) if r.inputs is not None else None,
                predictions=json.loads(r.predictions) if r.predictions is not None else None,
                truncated=bool(r.truncated),
            )
            for r in rows
        ],
        next_cursor=encode_cursor(rows[-1].id) if more else None,
    )
