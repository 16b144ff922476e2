"""Live run and step status changes as Server-Sent Events (`GET /api/v1/events`).

Each stream polls the store (every 0.5 s by default) with a few indexed queries:
runs created lately, runs that are PENDING or RUNNING, the runs it saw active last
time, and the steps of those runs that are active or started/ended lately. It keeps
the last status it knows of each, and sends only what changed:

    event: run    data: {"run_id", "workflow", "status", "previous_status",
                         "parent_id", "created_at", "started_at", "ended_at",
                         "error_type", "error_message"}
    event: step   data: {"run_id", "seq", "key", "task", "status",
                         "previous_status", "attempts", "started_at",
                         "ended_at", "child_run_id", "cached_from"}

`previous_status` is null for a run or step the stream had not seen. The stream
opens with `event: hello` (`{"time", "poll_seconds"}`): what happened before it
is read with the REST calls. Comment lines keep idle connections open.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from keel.server.routes.common import AUTH, ERRORS, SSE_HEADERS, Store, Viewer, sse
from keel.status import FINISHED_RUN
from keel.store.metadata import MetadataStore
from keel.store.schema import runs, steps

router = APIRouter(tags=["events"], dependencies=AUTH, responses=ERRORS)

# How far back "lately" reaches: a row committed a little after the time it carries
# (a batched write, another host's clock) is still seen.
LOOKBACK_SECONDS = 10.0
KEEPALIVE_SECONDS = 15.0
ACTIVE = ("PENDING", "RUNNING")
_RUN_COLUMNS = (
    runs.c.id,
    runs.c.workflow,
    runs.c.status,
    runs.c.parent_id,
    runs.c.created_at,
    runs.c.started_at,
    runs.c.ended_at,
    runs.c.error_type,
    runs.c.error_message,
)
_STEP_COLUMNS = (
    steps.c.run_id,
    steps.c.seq,
    steps.c.key,
    steps.c.task,
    steps.c.status,
    steps.c.attempts,
    steps.c.started_at,
    steps.c.ended_at,
    steps.c.child_run_id,
    steps.c.cached_from,
)


def _chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Watcher:
    """What one stream knows, and the changes since its last look."""

    def __init__(self, store: MetadataStore, run_id: str | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.runs: dict[str, tuple[str, float]] = {}  # id -> (status, created_at)
        self.steps: dict[tuple[str, int], tuple[str, int]] = {}  # -> (status, attempts)
        self.last = time.time()

    def _scope(self, stmt: sa.Select[Any]) -> sa.Select[Any]:
        if self.run_id is None:
            return stmt
        return stmt.where(
            sa.or_(
                runs.c.id == self.run_id, runs.c.id.startswith(self.run_id + ".", autoescape=True)
            )
        )

    def poll(self) -> list[tuple[str, dict[str, Any]]]:
        now = time.time()
        floor = self.last - LOOKBACK_SECONDS
        events: list[tuple[str, dict[str, Any]]] = []
        found: dict[str, Any] = {}
        with self.store.engine.connect() as conn:
            for stmt in (
                sa.select(*_RUN_COLUMNS).where(runs.c.created_at > floor),
                sa.select(*_RUN_COLUMNS).where(runs.c.status.in_(ACTIVE)),
            ):
                for row in conn.execute(self._scope(stmt)):
                    found[row.id] = row
            unseen = [
                rid for rid, (st, _) in self.runs.items() if st in ACTIVE and rid not in found
            ]
            for chunk in _chunks(unseen):
                for row in conn.execute(sa.select(*_RUN_COLUMNS).where(runs.c.id.in_(chunk))):
                    found[row.id] = row
            changed: set[str] = set()
            moved: list[tuple[str, dict[str, Any]]] = []
            for row in found.values():
                known = self.runs.get(row.id)
                if known is None or known[0] != row.status:
                    changed.add(row.id)
                    # A new run comes before its steps; a change after them (a run
                    # ends once its steps have).
                    into = events if known is None else moved
                    into.append(("run", _run_event(row, known[0] if known else None)))
                self.runs[row.id] = (row.status, row.created_at)
            watched = sorted(changed | {r for r, row in found.items() if row.status in ACTIVE})
            for chunk in _chunks(watched):
                stmt = sa.select(*_STEP_COLUMNS).where(
                    steps.c.run_id.in_(chunk),
                    sa.or_(
                        steps.c.status.in_(ACTIVE),
                        steps.c.started_at > floor,
                        steps.c.ended_at > floor,
                    ),
                )
                for s in conn.execute(stmt.order_by(steps.c.run_id, steps.c.seq)):
                    key = (s.run_id, s.seq)
                    before = self.steps.get(key)
                    if before != (s.status, s.attempts):
                        events.append(("step", _step_event(s, before[0] if before else None)))
                        self.steps[key] = (s.status, s.attempts)
        self._forget(floor)
        self.last = now
        return events + moved

    def _forget(self, floor: float) -> None:
        """Drop finished runs that no query of the next look would return."""
        gone = {
            rid
            for rid, (status, created) in self.runs.items()
            if status in FINISHED_RUN and created <= floor
        }
        for rid in gone:
            del self.runs[rid]
        if gone:
            self.steps = {k: v for k, v in self.steps.items() if k[0] not in gone}


def _run_event(row: Any, previous: str | None) -> dict[str, Any]:
    return {
        "run_id": row.id,
        "workflow": row.workflow,
        "status": row.status,
        "previous_status": previous,
        "parent_id": row.parent_id,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "error_type": row.error_type,
        "error_message": row.error_message,
    }


def _step_event(row: Any, previous: str | None) -> dict[str, Any]:
    return {
        "run_id": row.run_id,
        "seq": row.seq,
        "key": row.key,
        "task": row.task,
        "status": row.status,
        "previous_status": previous,
        "attempts": row.attempts,
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "child_run_id": row.child_run_id,
        "cached_from": row.cached_from,
    }


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
def events(
    request: Request,
    _: Viewer,
    store: Store,
    run_id: Annotated[
        str | None,
        Query(max_length=200, description="Only this run and its child runs"),
    ] = None,
) -> StreamingResponse:
    """Run and step status changes, live, as Server-Sent Events (shapes in docs/rest.md)."""
    poll = float(getattr(request.app.state, "sse_poll_seconds", 0.5))
    return StreamingResponse(
        _stream(request, Watcher(store, run_id), poll),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _stream(request: Request, watcher: Watcher, poll: float) -> AsyncIterator[str]:
    await anyio.to_thread.run_sync(watcher.poll)  # what exists now is known, not sent
    counter = 0
    yield sse("hello", {"time": time.time(), "poll_seconds": poll})
    last_sent = time.monotonic()
    while not await request.is_disconnected():
        await anyio.sleep(poll)
        for event, data in await anyio.to_thread.run_sync(watcher.poll):
            counter += 1
            yield sse(event, data, counter)
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
