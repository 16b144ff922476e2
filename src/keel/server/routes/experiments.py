"""Experiments, their runs as a table of params and metrics, and run comparison."""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel

from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Store, Viewer, get_run_row, loads
from keel.server.routes.metrics import Number, number, run_data
from keel.store.metadata import MetadataStore
from keel.store.schema import experiments, latest_metrics, params, runs, tags

router = APIRouter(tags=["experiments"], dependencies=AUTH, responses=ERRORS)


class ExperimentOut(BaseModel):
    id: int
    name: str
    lifecycle_stage: str
    tags: dict[str, str]
    created_at: float
    updated_at: float
    runs: int


class TrackedRun(BaseModel):
    run_id: str
    seq: int
    step_key: str | None
    experiment_id: int | None
    run_name: str | None
    status: str
    kind: str
    start_time: float | None
    end_time: float | None
    params: dict[str, str]
    metrics: dict[str, Number]
    tags: dict[str, str]


class RunTable(BaseModel):
    experiment_id: int | None
    runs: list[TrackedRun]
    param_keys: list[str]
    metric_keys: list[str]


class Comparison(BaseModel):
    runs: list[TrackedRun]
    param_keys: list[str]
    metric_keys: list[str]
    differing_params: list[str]


def _experiment(row: Any, count: int) -> ExperimentOut:
    return ExperimentOut(
        id=row.id,
        name=row.name,
        lifecycle_stage=row.lifecycle_stage,
        tags={str(k): str(v) for k, v in loads(row.tags, {}).items()},
        created_at=row.created_at,
        updated_at=row.updated_at,
        runs=count,
    )


@router.get("/experiments", response_model=list[ExperimentOut])
def list_experiments(_: Viewer, store: Store, include_deleted: bool = False) -> list[ExperimentOut]:
    """Every experiment, oldest first, with its number of top-level runs."""
    counts = (
        sa.select(runs.c.experiment_id, sa.func.count().label("n"))
        .where(runs.c.parent_id.is_(None), runs.c.lifecycle_stage == "active")
        .group_by(runs.c.experiment_id)
        .subquery()
    )
    stmt = (
        sa.select(experiments, counts.c.n)
        .select_from(experiments.outerjoin(counts, counts.c.experiment_id == experiments.c.id))
        .order_by(experiments.c.id)
    )
    if not include_deleted:
        stmt = stmt.where(experiments.c.lifecycle_stage == "active")
    with store.engine.connect() as conn:
        return [_experiment(r, int(r.n or 0)) for r in conn.execute(stmt)]


def _get(store: MetadataStore, ref: str) -> Any:
    by_id = ref.isascii() and ref.isdigit() and len(ref) < 10
    column = experiments.c.id if by_id else experiments.c.name
    value: Any = int(ref) if column is experiments.c.id else ref
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(experiments).where(column == value)).first()
        if row is None:
            raise ApiError(404, "not_found", f"no experiment {ref!r}")
        count = conn.execute(
            sa.select(sa.func.count())
            .select_from(runs)
            .where(runs.c.experiment_id == row.id, runs.c.parent_id.is_(None))
        ).scalar()
    return row, int(count or 0)


@router.get("/experiments/{experiment}", response_model=ExperimentOut)
def get_experiment(experiment: str, _: Viewer, store: Store) -> ExperimentOut:
    """An experiment by id or by name."""
    return _experiment(*_get(store, experiment))


def tracked_runs(store: MetadataStore, keys: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Params, latest metrics and tags of the given (run_id, seq) pairs."""
    wanted = set(keys)
    found: dict[tuple[str, int], dict[str, dict[str, Any]]] = {
        k: {"params": {}, "metrics": {}, "tags": {}} for k in keys
    }
    run_ids = sorted({r for r, _ in keys})
    with store.engine.connect() as conn:
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start : start + 500]
            for name, table in (("params", params), ("tags", tags)):
                for r in conn.execute(
                    sa.select(table.c.run_id, table.c.seq, table.c.key, table.c.value).where(
                        table.c.run_id.in_(chunk)
                    )
                ):
                    if (r.run_id, r.seq) in wanted:
                        found[(r.run_id, r.seq)][name][r.key] = r.value
            for r in conn.execute(
                sa.select(latest_metrics).where(latest_metrics.c.run_id.in_(chunk))
            ):
                if (r.run_id, r.seq) in wanted:
                    found[(r.run_id, r.seq)]["metrics"][r.key] = number(r.value, r.is_nan)
    return [found[k] for k in keys]


def _table(store: MetadataStore, rows: list[Any], experiment_id: int | None) -> RunTable:
    keys = [(r.run_id, int(r.seq)) for r in rows]
    details = tracked_runs(store, keys)
    out = [
        TrackedRun(
            run_id=r.run_id,
            seq=int(r.seq),
            step_key=r.step_key,
            experiment_id=r.experiment_id,
            run_name=r.run_name,
            status=r.status,
            kind=r.kind,
            start_time=r.start_time,
            end_time=r.end_time,
            **d,
        )
        for r, d in zip(rows, details, strict=True)
    ]
    return RunTable(
        experiment_id=experiment_id,
        runs=out,
        param_keys=sorted({k for r in out for k in r.params}),
        metric_keys=sorted({k for r in out for k in r.metrics}),
    )


@router.get("/experiments/{experiment}/runs", response_model=RunTable)
def experiment_runs(
    experiment: str,
    _: Viewer,
    store: Store,
    filter: Annotated[
        str,
        Query(
            max_length=2000,
            description="e.g. metrics.accuracy > 0.9 and params.model = 'svc' "
            "(the grammar of keel.search_runs)",
        ),
    ] = "",
    order_by: Annotated[
        list[str] | None, Query(max_length=10, description="e.g. metrics.accuracy DESC")
    ] = None,
    include_steps: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> RunTable:
    """The experiment's runs as a table: params, latest metrics and tags per run,
    filtered and ordered like keel.search_runs (newest first by default)."""
    from keel.tracking.filters import parse_filter, parse_order_by
    from keel.tracking.search import build_query

    row, _count = _get(store, experiment)
    expr = parse_filter(filter)
    order = [parse_order_by(item) for item in order_by or ()]
    stmt = build_query(
        store,
        experiment_ids=[row.id],
        expr=expr,
        keys=order,
        max_results=limit,
        include_steps=include_steps,
    )
    with store.engine.connect() as conn:
        found = list(conn.execute(stmt))
    return _table(store, found, row.id)


@router.get("/compare", response_model=Comparison)
def compare_runs(
    _: Viewer,
    store: Store,
    run_id: Annotated[list[str], Query(min_length=1, max_length=50)],
) -> Comparison:
    """Several runs side by side: their params, latest metrics and tags, and which
    params differ between them."""
    table = []
    for each in run_id:
        row = get_run_row(store, each)
        data = run_data(store, row.id, -1)
        table.append(
            TrackedRun(
                run_id=row.id,
                seq=-1,
                step_key=None,
                experiment_id=row.experiment_id,
                run_name=row.run_name,
                status=row.status,
                kind=row.kind,
                start_time=row.started_at,
                end_time=row.ended_at,
                params=data.params,
                metrics={m.key: m.value for m in data.metrics},
                tags=data.tags,
            )
        )
    param_keys = sorted({k for r in table for k in r.params})
    return Comparison(
        runs=table,
        param_keys=param_keys,
        metric_keys=sorted({k for r in table for k in r.metrics}),
        differing_params=[k for k in param_keys if len({r.params.get(k) for r in table}) > 1],
    )
