"""Steps of a run (the DAG: deps, child runs) and their attempts."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel

from keel.server.routes.common import AUTH, ERRORS, Store, Viewer, find_step, get_run_row, loads
from keel.store.schema import attempts, steps

router = APIRouter(tags=["steps"], dependencies=AUTH, responses=ERRORS)


class AttemptOut(BaseModel):
    attempt: int
    status: str
    started_at: float | None
    ended_at: float | None
    duration: float | None
    error_type: str | None
    error_message: str | None


class AttemptDetail(AttemptOut):
    traceback: str | None


class StepOut(BaseModel):
    run_id: str
    seq: int
    key: str
    task: str
    kind: str
    status: str
    attempts: int
    started_at: float | None
    ended_at: float | None
    duration: float | None
    deps: list[int]
    child_run_id: str | None
    cached_from: str | None
    cache: dict[str, Any] | None
    has_output: bool
    output_type: str | None
    output_size: int | None
    output_hash: str | None
    error_type: str | None
    error_message: str | None
    attempt_list: list[AttemptOut]


class StepDetail(StepOut):
    consumers: list[int]
    attempt_details: list[AttemptDetail]


class StepPage(BaseModel):
    run_id: str
    steps: list[StepOut]
    next_after: int | None


def _duration(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


def _attempt(row: Any) -> AttemptOut:
    return AttemptOut(
        attempt=row.attempt,
        status=row.status,
        started_at=row.started_at,
        ended_at=row.ended_at,
        duration=_duration(row.started_at, row.ended_at),
        error_type=row.error_type,
        error_message=row.error_message,
    )


def _fields(row: Any, tries: list[AttemptOut]) -> dict[str, Any]:
    cache = loads(row.cache_info, None)
    if isinstance(cache, dict):
        cache["key"] = row.cache_key
    return {
        "run_id": row.run_id,
        "seq": row.seq,
        "key": row.key,
        "task": row.task,
        "kind": row.kind,
        "status": row.status,
        "attempts": row.attempts,
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "duration": _duration(row.started_at, row.ended_at),
        "deps": [int(d) for d in loads(row.deps, [])],
        "child_run_id": row.child_run_id,
        "cached_from": row.cached_from,
        "cache": cache if isinstance(cache, dict) else None,
        "has_output": row.output_serializer is not None,
        "output_type": row.output_type,
        "output_size": row.output_size,
        "output_hash": row.output_hash,
        "error_type": row.error_type,
        "error_message": row.error_message,
        "attempt_list": tries,
    }


# Everything but the inline output bytes.
_STEP_COLUMNS = [c for c in steps.c if c.name != "output_inline"]
_ATTEMPT_COLUMNS = [c for c in attempts.c if c.name != "traceback"]


@router.get("/runs/{run_id}/steps", response_model=StepPage)
def list_steps(
    run_id: str,
    _: Viewer,
    store: Store,
    after: Annotated[
        int | None, Query(ge=-1, le=2**62, description="Only steps with a larger seq")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
) -> StepPage:
    """The run's steps in call order, with their attempts: enough to draw the DAG
    (`deps` are the seqs of the steps whose outputs a step took) and a timeline."""
    row = get_run_row(store, run_id)
    stmt = sa.select(*_STEP_COLUMNS).where(steps.c.run_id == row.id)
    if after is not None:
        stmt = stmt.where(steps.c.seq > after)
    with store.engine.connect() as conn:
        found = conn.execute(stmt.order_by(steps.c.seq).limit(limit + 1)).all()
        more = len(found) > limit
        found = found[:limit]
        tries: dict[int, list[AttemptOut]] = defaultdict(list)
        if found:
            rows = conn.execute(
                sa.select(*_ATTEMPT_COLUMNS)
                .where(
                    attempts.c.run_id == row.id,
                    attempts.c.seq >= found[0].seq,
                    attempts.c.seq <= found[-1].seq,
                )
                .order_by(attempts.c.seq, attempts.c.attempt)
            )
            for a in rows:
                tries[a.seq].append(_attempt(a))
    return StepPage(
        run_id=row.id,
        steps=[StepOut(**_fields(s, tries.get(s.seq, []))) for s in found],
        next_after=found[-1].seq if more else None,
    )


@router.get("/runs/{run_id}/steps/{step}", response_model=StepDetail)
def get_step(run_id: str, step: str, _: Viewer, store: Store) -> StepDetail:
    """One step, by key (`train-3`), position (`3`) or task name when it ran once;
    with its attempts (and their tracebacks) and the steps that consumed its output."""
    run = get_run_row(store, run_id)
    row = find_step(store, run.id, step)
    details = [
        AttemptDetail(**_attempt(a).model_dump(), traceback=a.traceback)
        for a in store.load_attempts(run.id, row.seq)
    ]
    consumers = [s.seq for s in store.steps_consuming(run.id, row.seq)]
    return StepDetail(
        **_fields(row, [AttemptOut(**d.model_dump(exclude={"traceback"})) for d in details]),
        consumers=consumers,
        attempt_details=details,
    )
