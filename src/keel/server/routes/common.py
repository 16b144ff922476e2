"""Helpers the route modules share: finding runs and steps, cursors, JSON columns."""

from __future__ import annotations

import base64
import json
import math
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Request, Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from sqlalchemy.engine import Row

from keel.server.auth import Principal
from keel.server.deps import get_store, require
from keel.server.errors import ApiError
from keel.store.limits import shown, text_problem
from keel.store.metadata import MetadataStore
from keel.store.schema import steps


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorReply(BaseModel):
    """Every error: `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody


# The error replies every route may give, documented once for the OpenAPI document.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorReply, "description": text}
    for status, text in (
        (
            400,
            "Bad request (a bad cursor, filter or argument, JSON nested too deep, a Host "
            "that does not name this server)",
        ),
        (401, "No API token, or one that is not valid"),
        (403, "The token's role does not allow this, or a change sent from another site"),
        (404, "No such run, step, artifact, model or workflow"),
        (409, "The thing is in a state that does not allow this"),
        (413, "The request body is larger than the server accepts"),
        (415, "A change whose body is not JSON (Content-Type: application/json)"),
        (422, "The request does not validate"),
        (503, "The metadata store is unavailable"),
    )
}

# `Authorization: Bearer <token>`, described in the OpenAPI document; the check
# itself is `require(role)`. Without tokens in the store, none is needed.
BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token from `keel token create` (not needed while none exists)",
)
AUTH = [Security(BEARER)]

# The dependencies almost every route takes.
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def _checked_store(
    request: Request, store: Annotated[MetadataStore, Depends(get_store)]
) -> MetadataStore:
    """The store, once the request's path and query values are known to be storable:
    a NUL character (which PostgreSQL refuses, and SQLite would look up) is a 400
    naming the parameter on both databases. (JSON bodies are pydantic models, which
    refuse lone surrogates themselves.)"""
    for where, items in (
        ("path parameter", request.path_params.items()),
        ("query parameter", request.query_params.multi_items()),
    ):
        for name, value in items:
            problem = text_problem(value) if isinstance(value, str) else None
            if problem is not None:
                raise ApiError(
                    400,
                    "bad_request",
                    f"{where} {name!r}: {shown(value)} has {problem}",
                    {"field": name},
                )
    return store


# The store for a route; every route takes it, so every route checks its parameters.
Store = Annotated[MetadataStore, Depends(_checked_store)]


def app_state(request: Request) -> Any:
    return request.app.state


def loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def get_run_row(store: MetadataStore, run_id: str) -> Row[Any]:
    """The run with that id (or an unambiguous prefix); 404 otherwise."""
    row = store.get_run(store.resolve_run_id(run_id))
    if row is None:  # deleted between the two reads
        raise ApiError(404, "not_found", f"no run with id {run_id!r}")
    return row


def find_step(store: MetadataStore, run_id: str, ref: str) -> Row[Any]:
    """A step of a run by key (`train-3`), position (`3`) or task name when it ran once."""
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(steps).where(steps.c.run_id == run_id, steps.c.key == ref)
        ).first()
        if row is None and ref.isascii() and ref.isdigit() and len(ref) < 10:
            row = conn.execute(
                sa.select(steps).where(steps.c.run_id == run_id, steps.c.seq == int(ref))
            ).first()
        if row is None:
            named = conn.execute(
                sa.select(steps).where(steps.c.run_id == run_id, steps.c.task == ref).limit(6)
            ).all()
            if len(named) == 1:
                row = named[0]
            elif named:
                raise ApiError(
                    404,
                    "not_found",
                    f"task {ref!r} ran as several steps in run {run_id}",
                    {"hint": "Name one by key: " + ", ".join(r.key for r in named[:5])},
                )
    if row is None:
        raise ApiError(
            404,
            "not_found",
            f"run {run_id} has no step {ref!r}",
            {"hint": f"List its steps: GET /api/v1/runs/{run_id}/steps"},
        )
    return row


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(values)).encode()).decode()


def decode_cursor(cursor: str, kinds: tuple[type, ...]) -> list[Any]:
    """The values of a cursor this server returned, checked against their types."""
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not isinstance(values, list) or len(values) != len(kinds):
            raise ValueError
        out = []
        for value, kind in zip(values, kinds, strict=True):
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError
            out.append(value)
        return out
    except Exception:
        raise ApiError(400, "bad_cursor", "the cursor is not one this server returned") from None


def sse(event: str, data: Any, event_id: str | int | None = None) -> str:
    """One Server-Sent Event: `event:`, optional `id:`, and the JSON data on one line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# Headers for event streams: no caching, and no buffering by a reverse proxy.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
