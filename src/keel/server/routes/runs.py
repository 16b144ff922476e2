"""Runs: list (filters, cursor pagination, newest first) and get."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from keel.server.auth import Principal
from keel.server.deps import get_store, require
from keel.server.errors import ApiError
from keel.status import RunStatus
from keel.store.metadata import MetadataStore
from keel.store.schema import runs

router = APIRouter(tags=["runs"])


class RunOut(BaseModel):
    id: str
    workflow: str
    kind: str
    status: str
    params: dict[str, Any]
    tags: dict[str, str]
    parent_id: str | None
    retry_of: str | None
    experiment_id: int | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    error_type: str | None
    error_message: str | None


class RunPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


def run_out(row: Any) -> RunOut:
    return RunOut(
        id=row.id,
        workflow=row.workflow,
        kind=row.kind,
        status=row.status,
        params=json.loads(row.params) if row.params else {},
        tags=json.loads(row.tags) if row.tags else {},
        parent_id=row.parent_id,
        retry_of=row.retry_of,
        experiment_id=row.experiment_id,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        error_type=row.error_type,
        error_message=row.error_message,
    )


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, run_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(run_id)
    except Exception:
        raise ApiError(400, "bad_cursor", "the cursor is not one this server returned") from None


def _encode_cursor(row: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.created_at, row.id]).encode()).decode()


@router.get("/runs", response_model=RunPage)
def list_runs(
    _: Annotated[Principal, Depends(require("viewer"))],
    store: Annotated[MetadataStore, Depends(get_store)],
    workflow: str | None = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    parent_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> RunPage:
    """Runs, newest first. Pass `next_cursor` back as `cursor` for the next page."""
    stmt = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
    if workflow is not None:
        stmt = stmt.where(runs.c.workflow == workflow)
    if status:
        stmt = stmt.where(runs.c.status.in_([str(s) for s in status]))
    stmt = stmt.where(
        runs.c.parent_id == parent_id if parent_id is not None else runs.c.parent_id.is_(None)
    )
    if cursor is not None:
        created_at, run_id = _decode_cursor(cursor)
        stmt = stmt.where(
            sa.or_(
                runs.c.created_at < created_at,
                sa.and_(runs.c.created_at == created_at, runs.c.id < run_id),
            )
        )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return RunPage(
        runs=[run_out(r) for r in rows], next_cursor=_encode_cursor(rows[-1]) if more else None
    )


@router.get("/runs/{run_id}", response_model=RunOut)
def get_run(
    run_id: str,
    _: Annotated[Principal, Depends(require("viewer"))],
    store: Annotated[MetadataStore, Depends(get_store)],
) -> RunOut:
    row = store.get_run(store.resolve_run_id(run_id))
    assert row is not None
    return run_out(row)
