"""Logs: ranged reads of what a run's steps printed and logged, and a live tail as
Server-Sent Events.

A log record is one chunk of consecutive output of one stream (stdout, stderr or
log) of one step attempt: one or more lines. Records are numbered by `id`, in the
order they were recorded, so `after=<id>` continues a read where the last stopped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from keel.server.routes.common import (
    AUTH,
    ERRORS,
    SSE_HEADERS,
    Store,
    Viewer,
    find_step,
    get_run_row,
    sse,
)
from keel.status import FINISHED_RUN
from keel.store.metadata import MetadataStore
from keel.store.schema import logs, runs, steps

router = APIRouter(tags=["logs"], dependencies=AUTH, responses=ERRORS)

KEEPALIVE_SECONDS = 15.0


class LogRecord(BaseModel):
    id: int
    seq: int
    step_key: str | None
    attempt: int
    stream: str
    text: str
    created_at: float


class LogPage(BaseModel):
    run_id: str
    records: list[LogRecord]
    next_after: int | None


def _query(
    store: MetadataStore, run_id: str, seq: int | None, attempt: int | None, after: int | None
) -> sa.Select[Any]:
    stmt = (
        sa.select(logs, steps.c.key)
        .select_from(
            logs.outerjoin(
                steps, sa.and_(steps.c.run_id == logs.c.run_id, steps.c.seq == logs.c.seq)
            )
        )
        .where(logs.c.run_id == run_id)
    )
    if seq is not None:
        stmt = stmt.where(logs.c.seq == seq)
    if attempt is not None:
        stmt = stmt.where(logs.c.attempt == attempt)
    if after is not None:
        stmt = stmt.where(logs.c.id > after)
    return stmt.order_by(logs.c.id)


def _record(row: Any) -> LogRecord:
    return LogRecord(
        id=row.id,
        seq=row.seq,
        step_key=row.key,
        attempt=row.attempt,
        stream=row.stream,
        text=row.text,
        created_at=row.created_at,
    )


def _step_seq(store: MetadataStore, run_id: str, step: str | None) -> int | None:
    return None if step is None else int(find_step(store, run_id, step).seq)


@router.get("/runs/{run_id}/logs", response_model=LogPage)
def read_logs(
    run_id: str,
    _: Viewer,
    store: Store,
    step: Annotated[str | None, Query(description="A step key, seq or task name")] = None,
    attempt: Annotated[int | None, Query(ge=1, le=2**31)] = None,
    after: Annotated[int | None, Query(ge=0, le=2**62, description="Records after this id")] = None,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="Records to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> LogPage:
    """A range of the log records of a run (or of one step, or one attempt of it), in
    recorded order. Continue with `after=next_after` (cheap at any depth), or address
    a range directly with `offset` and `limit`."""
    row = get_run_row(store, run_id)
    seq = _step_seq(store, row.id, step)
    stmt = _query(store, row.id, seq, attempt, after).offset(offset).limit(limit + 1)
    with store.engine.connect() as conn:
        found = conn.execute(stmt).all()
    more = len(found) > limit
    found = found[:limit]
    return LogPage(
        run_id=row.id,
        records=[_record(r) for r in found],
        next_after=found[-1].id if more else None,
    )


@router.get(
    "/runs/{run_id}/logs/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def tail_logs(
    run_id: str,
    request: Request,
    _: Viewer,
    store: Store,
    step: Annotated[str | None, Query(description="A step key, seq or task name")] = None,
    attempt: Annotated[int | None, Query(ge=1, le=2**31)] = None,
    after: Annotated[
        int | None, Query(ge=0, le=2**62, description="Start after this record id")
    ] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Follow a run's logs live as Server-Sent Events: one `log` event per record (its
    `id:` is the record id, so a reconnecting EventSource continues where it was),
    then one `end` event with the run's final status once the run has finished."""
    row = get_run_row(store, run_id)
    seq = _step_seq(store, row.id, step)
    given = last_event_id or ""
    if given.isascii() and given.isdigit() and len(given) < 18:
        after = int(given)
    poll = float(getattr(request.app.state, "sse_poll_seconds", 0.5))
    return StreamingResponse(
        _tail(request, store, row.id, seq, attempt, after, poll),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _tail(
    request: Request,
    store: MetadataStore,
    run_id: str,
    seq: int | None,
    attempt: int | None,
    after: int | None,
    poll: float,
) -> AsyncIterator[str]:
    last_sent = time.monotonic()

    def read(cursor: int | None) -> tuple[list[Any], str | None]:
        with store.engine.connect() as conn:
            # The status first: records committed before it was read are then all seen.
            status = conn.execute(sa.select(runs.c.status).where(runs.c.id == run_id)).scalar()
            found = list(conn.execute(_query(store, run_id, seq, attempt, cursor).limit(500)))
        return found, status

    yield ": keel log stream\n\n"
    while True:
        found, status = await anyio.to_thread.run_sync(read, after)
        for r in found:
            yield sse("log", _record(r).model_dump(), r.id)
            after = r.id
        if found:
            last_sent = time.monotonic()
            if len(found) == 500:
                continue
        elif status is None or status in FINISHED_RUN:
            yield sse("end", {"run_id": run_id, "status": status})
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await anyio.sleep(poll)
