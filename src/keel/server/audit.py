"""The audit log of mutating calls (POST, PUT, PATCH, DELETE), written in the same
database transaction as the change it records.

`AuditMiddleware` opens a pending record for each mutating request; `arm()` (called
by the role check once the caller is known) makes it ready; the first commit on the
store's engine during that request then inserts the audit row on the same connection,
before the commit: the change and its audit row are committed together or not at all,
so a database blip can never turn a committed change into an error reply (which
clients would retry into duplicates). Requests that change nothing (refused, failed
before writing) get their row after the reply, on a best-effort basis; anonymous 401s
get none, so they cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel.store.metadata import MetadataStore
from keel.store.schema import audit_log

log = logging.getLogger("keel.server.audit")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Query parameters whose values are secrets (the webhook's `?token=`): stored redacted.
_SECRET_PARAMS = ("token",)
REDACTED = "***"


@dataclass(slots=True)
class Pending:
    """The audit row of the request being served."""

    method: str
    path: str
    detail: str | None
    actor: str | None = None
    role: str | None = None
    status: int = 200  # the route's success status, until the reply says otherwise
    armed: bool = False
    row_id: int | None = None


_pending: ContextVar[Pending | None] = ContextVar("keel_audit_pending", default=None)


def redacted_query(query: str) -> str:
    """The query string with the values of secret parameters replaced."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode(
        [(k, REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*"
    )


def arm(name: str, role: str, status: int | None) -> None:
    """The caller is known and the route is about to run: its first commit carries
    the audit row (with the route's success status)."""
    pending = _pending.get()
    if pending is not None and pending.row_id is None:
        pending.actor, pending.role = name, role
        pending.status = status or 200
        pending.armed = True


def _values(p: Pending) -> dict[str, Any]:
    return {
        "at": time.time(),
        "actor": p.actor,
        "role": p.role,
        "method": p.method,
        "path": p.path,
        "status": p.status,
        "detail": p.detail,
    }


def _on_commit(conn: sa.Connection) -> None:
    pending = _pending.get()
    if pending is None or not pending.armed or pending.row_id is not None:
        return
    pending.row_id = -1  # taken: a nested commit must not write a second row
    try:
        key = conn.execute(audit_log.insert().values(**_values(pending))).inserted_primary_key
    except Exception:
        pending.row_id = None  # the commit fails with it; the reply's row comes later
        raise
    pending.row_id = int(key[0]) if key else -1


def install(store: MetadataStore) -> None:
    """Have the store's commits made while serving a request carry its audit row."""
    if not sa.event.contains(store.engine, "commit", _on_commit):
        sa.event.listen(store.engine, "commit", _on_commit)


def _finish(store: MetadataStore, pending: Pending, status: int, principal: Any) -> None:
    """After the reply: correct the status of a row written with the change, or write
    the row of a request that committed nothing. Never raises: the reply is sent."""
    try:
        if pending.row_id is not None:  # written with the change
            if status != pending.status and pending.row_id > 0:
                with store.engine.begin() as conn:
                    conn.execute(
                        audit_log.update()
                        .where(audit_log.c.id == pending.row_id)
                        .values(status=status)
                    )
            return
        if principal is None and status == 401:
            return  # anonymous and refused: nothing happened, and nobody to name
        pending.armed = False
        pending.actor = getattr(principal, "name", pending.actor)
        pending.role = getattr(principal, "role", pending.role)
        pending.status = status
        with store.engine.begin() as conn:
            conn.execute(audit_log.insert().values(**_values(pending)))
    except Exception as exc:  # the store is down: the change (if any) has its row
        log.warning("audit row of %s %s not written: %s", pending.method, pending.path, exc)


class AuditMiddleware:
    """Pure ASGI: a pending audit record around each mutating request."""

    def __init__(self, app: ASGIApp, store: MetadataStore) -> None:
        self.app = app
        self.store = store
        install(store)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING:
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"").decode("latin-1")
        detail = json.dumps({"query": redacted_query(query)}) if query else None
        pending = Pending(scope["method"], scope["path"], detail)
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        reset = _pending.set(pending)
        try:
            await self.app(scope, receive, watch)
        finally:
            _pending.reset(reset)
            principal = scope.get("state", {}).get("principal")
            await run_in_threadpool(_finish, self.store, pending, status, principal)
