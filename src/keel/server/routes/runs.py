"""Runs: list (filters, search, cursor pagination, newest first), get, and the
operator's actions: cancel, resume, retry, signal."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from keel.server.errors import ApiError
from keel.server.routes.common import (
    AUTH,
    ERRORS,
    Operator,
    Store,
    Viewer,
    decode_cursor,
    encode_cursor,
    get_run_row,
    loads,
)
from keel.server.workflows import dispatch_of, runner_of
from keel.status import FINISHED_RUN, RunStatus
from keel.store import queue
from keel.store.metadata import MetadataStore
from keel.store.schema import runs, tags

router = APIRouter(tags=["runs"], dependencies=AUTH, responses=ERRORS)


class OwnerLost(BaseModel):
    """Set on an unfinished run whose owner (the process driving it) stopped renewing
    its lease: nothing drives the run until a server or worker takes it over or a
    user resumes it."""

    since: float = Field(description="When the owner's lease ran out (Unix time)")
    owner: str = Field(description="The lost owner: host:pid:role")
    resume_command: str = Field(description="The command that continues the run")


class RunOut(BaseModel):
    id: str
    workflow: str
    run_name: str | None = None
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
    duration: float | None = None
    error_type: str | None
    error_message: str | None
    user: str | None = None
    executor: str | None = None
    entrypoint: str | None = None
    queue: str | None = None
    schedule: str | None = None
    trigger_name: str | None = None
    cancel_requested: bool = False
    owner_lost: OwnerLost | None = None


class RunDetail(RunOut):
    traceback: str | None = None
    result_type: str | None = None
    children: list[str] = Field(default_factory=list)


class RunPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None


def run_out(row: Any) -> RunOut:
    return RunOut(**_fields(row))


def lost_owners(store: MetadataStore, rows: Sequence[Any]) -> dict[str, OwnerLost]:
    """The unfinished runs among `rows` whose owner is lost (a child run, through its
    root), by run id."""
    roots = {r.id: r.id.split(".")[0] for r in rows if r.status not in FINISHED_RUN}
    found = queue.lost_owners(store, list(roots.values()))
    return {
        rid: OwnerLost(since=lost.since, owner=lost.owner, resume_command=f"keel resume {root}")
        for rid, root in roots.items()
        if (lost := found.get(root)) is not None
    }


def _tracked_tags(conn: sa.Connection, run_ids: list[str]) -> dict[str, dict[str, str]]:
    """The tags set on runs (keel.set_tag, launch tags), by run id."""
    out: dict[str, dict[str, str]] = {}
    if run_ids:
        rows = conn.execute(
            sa.select(tags.c.run_id, tags.c.key, tags.c.value).where(
                tags.c.run_id.in_(run_ids), tags.c.seq == -1
            )
        )
        for r in rows:
            out.setdefault(r.run_id, {})[r.key] = r.value
    return out


def _fields(row: Any, tracked: dict[str, str] | None = None) -> dict[str, Any]:
    ended = row.ended_at
    return {
        "id": row.id,
        "workflow": row.workflow,
        "run_name": row.run_name,
        "kind": row.kind,
        "status": row.status,
        "params": loads(row.params, {}),
        "tags": {**{str(k): str(v) for k, v in loads(row.tags, {}).items()}, **(tracked or {})},
        "parent_id": row.parent_id,
        "retry_of": row.retry_of,
        "experiment_id": row.experiment_id,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "ended_at": ended,
        "duration": ended - row.started_at if ended is not None and row.started_at else None,
        "error_type": row.error_type,
        "error_message": row.error_message,
        "user": row.user,
        "executor": row.executor,
        "entrypoint": row.entrypoint,
        "queue": row.queue,
        "schedule": row.schedule,
        "trigger_name": row.trigger_name,
        "cancel_requested": bool(row.cancel_requested),
    }


# The columns a list shows: everything but the potentially large ones.
_LIST_COLUMNS = [
    c for c in runs.c if c.name not in ("result_inline", "traceback", "tasks", "result_ref")
]


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_statement(
    store: MetadataStore,
    *,
    workflow: str | None = None,
    status: list[str] | None = None,
    kind: str | None = None,
    experiment_id: int | None = None,
    parent_id: str | None = None,
    include_children: bool = False,
    q: str | None = None,
    after: tuple[Any, ...] | None = None,
) -> sa.Select[Any]:
    """The keyset query of a page of runs (without its LIMIT): newest first, after the
    (created_at, id) of the previous page's last run."""
    stmt = sa.select(*_LIST_COLUMNS).order_by(runs.c.created_at.desc(), runs.c.id.desc())
    if workflow is not None:
        stmt = stmt.where(runs.c.workflow == workflow)
    if status:
        column: Any = runs.c.status
        if store.dialect == "sqlite" and workflow is None and experiment_id is None:
            # Left to itself SQLite reads the status index and sorts every matching run;
            # on an expression it walks the creation-time index backwards instead and
            # stops at the page's end. (PostgreSQL's planner makes that choice alone.)
            column = runs.c.status.concat("")
        stmt = stmt.where(column.in_(status))
    if kind is not None:
        stmt = stmt.where(runs.c.kind == kind)
    if experiment_id is not None:
        stmt = stmt.where(runs.c.experiment_id == experiment_id)
    if parent_id is not None:
        stmt = stmt.where(runs.c.parent_id == parent_id)
    elif not include_children:
        stmt = stmt.where(runs.c.parent_id.is_(None))
    if q:
        text = q.strip()
        pattern = f"%{_like(text)}%"
        stmt = stmt.where(
            sa.or_(
                runs.c.id.startswith(text, autoescape=True),
                runs.c.workflow.like(pattern, escape="\\"),
                runs.c.run_name.like(pattern, escape="\\"),
            )
        )
    if after is not None:
        created_at, run_id = after
        stmt = stmt.where(
            sa.or_(
                runs.c.created_at < created_at,
                sa.and_(runs.c.created_at == created_at, runs.c.id < run_id),
            )
        )
    return stmt


@router.get("/runs", response_model=RunPage)
def list_runs(
    _: Viewer,
    store: Store,
    workflow: str | None = None,
    status: Annotated[list[RunStatus] | None, Query()] = None,
    kind: Annotated[str | None, Query(max_length=16)] = None,
    experiment_id: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    parent_id: Annotated[str | None, Query(max_length=200)] = None,
    include_children: bool = False,
    q: Annotated[
        str | None,
        Query(max_length=200, description="Text in the run id, workflow or run name"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> RunPage:
    """Runs, newest first (by creation time, then id). Pass `next_cursor` back as
    `cursor` for the next page. Without `parent_id` or `include_children`, only
    top-level runs (not child runs) are listed."""
    stmt = list_statement(
        store,
        workflow=workflow,
        status=[str(s) for s in status or ()],
        kind=kind,
        experiment_id=experiment_id,
        parent_id=parent_id,
        include_children=include_children,
        q=q,
        after=tuple(decode_cursor(cursor, (float, str))) if cursor is not None else None,
    )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt.limit(limit + 1)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        tracked = _tracked_tags(conn, [r.id for r in rows])
    lost = lost_owners(store, rows)
    return RunPage(
        runs=[RunOut(**_fields(r, tracked.get(r.id)), owner_lost=lost.get(r.id)) for r in rows],
        next_cursor=encode_cursor(rows[-1].created_at, rows[-1].id) if more else None,
    )


@router.get("/runs/{run_id}", response_model=RunDetail)
def get_run(run_id: str, _: Viewer, store: Store) -> RunDetail:
    """One run; `run_id` may be an unambiguous prefix of the id."""
    row = get_run_row(store, run_id)
    with store.engine.connect() as conn:
        tracked = _tracked_tags(conn, [row.id]).get(row.id)
        children = list(
            conn.execute(
                sa.select(runs.c.id)
                .where(runs.c.parent_id == row.id)
                .order_by(runs.c.created_at, runs.c.id)
                .limit(1000)
            ).scalars()
        )
    return RunDetail(
        **_fields(row, tracked),
        owner_lost=lost_owners(store, [row]).get(row.id),
        traceback=row.traceback,
        result_type=row.result_type,
        children=children,
    )


# -- actions -------------------------------------------------------------------------------


class RunAction(BaseModel):
    run_id: str
    status: str
    message: str


class ResumeIn(BaseModel):
    force: bool = Field(False, description="Resume even if the run looks alive in another process")


class SignalIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    payload: Any = None


def _status(store: Any, run_id: str) -> str:
    row = store.get_run(run_id)
    return str(row.status) if row is not None else "UNKNOWN"


@router.post("/runs/{run_id}/cancel", response_model=RunAction)
def cancel_run(run_id: str, _: Operator, store: Store) -> RunAction:
    """Stop a run: no new steps start; recorded results are kept for a resume.
    A run still waiting in the queue is cancelled at once."""
    from keel.scheduler.launch import cancel_claimed, cancel_queued

    row = get_run_row(store, run_id)
    rid = row.id
    if row.status in (RunStatus.SUCCEEDED, RunStatus.FAILED):
        raise ApiError(
            409,
            "conflict",
            f"run {rid} already finished ({row.status}); there is nothing to cancel",
            {"run_id": rid, "status": row.status},
        )
    if row.status == RunStatus.CANCELLED:
        return RunAction(run_id=rid, status=row.status, message="the run was already cancelled")
    with store.engine.begin() as conn:
        dequeued = cancel_queued(conn, rid, "the run was cancelled")
    if not dequeued:
        cancel_claimed(store, rid)
    status = _status(store, rid)
    message = (
        "the run is cancelled"
        if status == RunStatus.CANCELLED
        else "the run was asked to stop; it starts no new steps"
    )
    return RunAction(run_id=rid, status=status, message=message)


def _top_level(row: Any, verb: str) -> None:
    if row.parent_id:
        root = row.parent_id.split(".")[0]
        raise ApiError(
            409,
            "conflict",
            f"run {row.id} is a child of run {row.parent_id}",
            {"hint": f"{verb.capitalize()} its root run {root}", "run_id": row.id},
        )


def _owner_alive(store: MetadataStore, row: Any) -> bool:
    """Whether the process driving the run may still be alive: the owner of the run's
    claim renews its lease; else (no claim) the process recorded on the run."""
    from keel.engine.owner import dead_owner

    lease = queue.run_lease(store, row.id)
    if lease is not None and lease.status == queue.CLAIMED:
        return dead_owner(lease) is None
    if row.pid is None:
        return False
    if row.host != socket.gethostname():
        return True  # a process on another host cannot be checked
    if row.pid == os.getpid():
        return False  # this server: its own threads are checked separately
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@router.post("/runs/{run_id}/resume", response_model=RunAction, status_code=202)
def resume_run(
    run_id: str,
    _: Operator,
    store: Store,
    request: Request,
    body: ResumeIn | None = None,
) -> RunAction:
    """Continue a crashed, failed or cancelled run by replay: recorded steps are not run
    again. The run is queued again; the server runs it (dispatch "server") or a
    `keel worker` does (dispatch "queue")."""
    force = body.force if body is not None else False
    row = get_run_row(store, run_id)
    rid = row.id
    _top_level(row, "resume")
    if row.status == RunStatus.SUCCEEDED:
        return RunAction(run_id=rid, status=row.status, message="the run already succeeded")
    state = request.app.state
    runner = runner_of(state)
    here = row.pid == os.getpid() and row.host == socket.gethostname()
    if runner.active(rid) or (row.status == RunStatus.RUNNING and here):
        raise ApiError(409, "conflict", f"run {rid} is running in this server", {"run_id": rid})
    if row.status == RunStatus.RUNNING and not force and _owner_alive(store, row):
        raise ApiError(
            409,
            "conflict",
            f"run {rid} is still running in process {row.pid} on {row.host}",
            {"hint": "Cancel it first, or pass force if that process is gone", "run_id": rid},
        )
    waiting = row.status == RunStatus.PENDING and queue.item_id_for(store, f"run:{rid}")
    if not waiting:
        store.update_run(
            rid,
            status=str(RunStatus.PENDING),
            ended_at=None,
            cancel_requested=False,
            host=None,
            pid=None,
        )
        queue.enqueue_run(store, rid, queue=row.queue or "default", priority=row.priority or 0)
    if dispatch_of(state) == "server":
        runner.follow(rid)
    where = "in the server" if dispatch_of(state) == "server" else "by a worker"
    return RunAction(run_id=rid, status=_status(store, rid), message=f"resumed {where}")


@router.post("/runs/{run_id}/retry", response_model=RunAction, status_code=202)
def retry_run(run_id: str, _: Operator, store: Store, request: Request) -> RunAction:
    """Start a new run of a finished run's workflow (its current code) that reuses the
    succeeded steps. Runs in the server; the reply names the new run."""
    row = get_run_row(store, run_id)
    _top_level(row, "retry")
    if row.status not in FINISHED_RUN:
        raise ApiError(
            409,
            "conflict",
            f"run {row.id} is {row.status}: only a finished run can be retried",
            {"hint": "Wait for it or cancel it first", "run_id": row.id},
        )
    new_id = runner_of(request.app.state).retry(row.id)
    return RunAction(run_id=new_id, status=_status(store, new_id), message=f"retry of run {row.id}")


@router.post("/runs/{run_id}/signal", response_model=RunAction)
def signal_run(run_id: str, body: SignalIn, _: Operator, store: Store) -> RunAction:
    """Send a signal (a name and a JSON payload) to a run waiting with
    `keel.wait_for_signal`; it is kept until the run reads it."""
    from keel.engine.api import signal

    row = get_run_row(store, run_id)
    try:
        json.dumps(body.payload)
    except (TypeError, ValueError):
        raise ApiError(422, "invalid_request", "the payload must be JSON data") from None
    if row.status in FINISHED_RUN:
        raise ApiError(
            409,
            "conflict",
            f"run {row.id} is {row.status}: it will never read signal {body.name!r}",
            {"run_id": row.id},
        )
    signal(row.id, body.name, body.payload, store=store)
    return RunAction(
        run_id=row.id, status=_status(store, row.id), message=f"signal {body.name!r} sent"
    )
