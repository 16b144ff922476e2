"""The audit log of mutating calls (admins): newest first, with cursor pagination."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel

from keel.server.routes.common import AUTH, ERRORS, Admin, Store, loads
from keel.store.schema import audit_log

router = APIRouter(tags=["audit"], dependencies=AUTH, responses=ERRORS)


class AuditEntry(BaseModel):
    id: int
    at: float
    actor: str | None
    role: str | None
    method: str
    path: str
    status: int
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    entries: list[AuditEntry]
    next_before: int | None


@router.get("/audit", response_model=AuditPage)
def list_audit(
    _: Admin,
    store: Store,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    before: Annotated[
        int | None, Query(ge=0, le=2**62, description="Entries with a smaller id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    """Who called what that changes something (POST, PUT, PATCH, DELETE), and the
    status it got. Continue with `before=next_before`."""
    stmt = sa.select(audit_log).order_by(audit_log.c.id.desc())
    if actor is not None:
        stmt = stmt.where(audit_log.c.actor == actor)
    if before is not None:
        stmt = stmt.where(audit_log.c.id < before)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(
        entries=[
            AuditEntry(
                id=r.id,
                at=r.at,
                actor=r.actor,
                role=r.role,
                method=r.method,
                path=r.path,
                status=r.status,
                detail=loads(r.detail, None),
            )
            for r in rows
        ],
        next_before=rows[-1].id if more else None,
    )
