"""Tracked data of a run or step: params, latest metrics, tags, and metric histories
(downsampled for long series).

Metric values are JSON numbers, except NaN and the infinities, which JSON lacks:
they are the strings "NaN", "Infinity" and "-Infinity" (as the MLflow API does).

Downsampling (`max_points`): a series longer than `max_points` is cut into
`max_points // 4` buckets of consecutive points; from each bucket the first, the
last, the lowest and the highest point are kept (in step order, without repeats).
So the first and last points of the series and every spike survive, and the
result has at most `max_points` points.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Query
from pydantic import BaseModel

from keel.server.routes.common import AUTH, ERRORS, Store, Viewer, find_step, get_run_row
from keel.store.metadata import MetadataStore
from keel.store.schema import latest_metrics, metrics, params, tags

router = APIRouter(tags=["metrics"], dependencies=AUTH, responses=ERRORS)

Number = float | str


class MetricValue(BaseModel):
    key: str
    value: Number
    step: int
    timestamp: float


class RunData(BaseModel):
    run_id: str
    seq: int
    params: dict[str, str]
    metrics: list[MetricValue]
    tags: dict[str, str]


class Point(BaseModel):
    step: int
    value: Number
    timestamp: float


class History(BaseModel):
    run_id: str
    seq: int
    key: str
    total: int
    downsampled: bool
    points: list[Point]


class Histories(BaseModel):
    key: str
    series: list[History]


def number(value: float | None, is_nan: bool = False) -> Number:
    if is_nan or value is None or math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return float(value)


def _seq(store: MetadataStore, run_id: str, step: str | None) -> int:
    return -1 if step is None else int(find_step(store, run_id, step).seq)


StepQuery = Annotated[
    str | None, Query(description="A step (key, seq or task name); the run itself if absent")
]
MaxPoints = Annotated[
    int, Query(ge=4, le=1_000_000, description="Downsample longer series to at most this")
]


def run_data(store: MetadataStore, run_id: str, seq: int) -> RunData:
    with store.engine.connect() as conn:
        found_params = conn.execute(
            sa.select(params.c.key, params.c.value).where(
                params.c.run_id == run_id, params.c.seq == seq
            )
        ).all()
        found_tags = conn.execute(
            sa.select(tags.c.key, tags.c.value).where(tags.c.run_id == run_id, tags.c.seq == seq)
        ).all()
        latest = conn.execute(
            sa.select(latest_metrics)
            .where(latest_metrics.c.run_id == run_id, latest_metrics.c.seq == seq)
            .order_by(latest_metrics.c.key)
        ).all()
    return RunData(
        run_id=run_id,
        seq=seq,
        params={r.key: r.value for r in found_params},
        metrics=[
            MetricValue(
                key=r.key, value=number(r.value, r.is_nan), step=r.step, timestamp=r.timestamp
            )
            for r in latest
        ],
        tags={r.key: r.value for r in found_tags},
    )


@router.get("/runs/{run_id}/data", response_model=RunData)
def get_data(run_id: str, _: Viewer, store: Store, step: StepQuery = None) -> RunData:
    """Params, latest metric values and tags of the run, or of one of its steps (each
    step is a nested tracked run)."""
    run = get_run_row(store, run_id)
    return run_data(store, run.id, _seq(store, run.id, step))


def downsample(points: list[tuple[int, float | None, bool, float]], max_points: int) -> list[int]:
    """Indexes of the points kept (see the module's docstring)."""
    n = len(points)
    if n <= max_points:
        return list(range(n))
    buckets = max(1, max_points // 4)
    keep: set[int] = set()
    for b in range(buckets):
        lo = b * n // buckets
        hi = (b + 1) * n // buckets
        if lo >= hi:
            continue
        keep.update((lo, hi - 1))
        finite = [i for i in range(lo, hi) if not points[i][2] and points[i][1] is not None]
        if finite:
            keep.add(min(finite, key=lambda i: points[i][1]))  # type: ignore[arg-type, return-value]
            keep.add(max(finite, key=lambda i: points[i][1]))  # type: ignore[arg-type, return-value]
    return sorted(keep)


def history(store: MetadataStore, run_id: str, seq: int, key: str, max_points: int) -> History:
    stmt = (
        sa.select(metrics.c.step, metrics.c.value, metrics.c.is_nan, metrics.c.timestamp)
        .where(metrics.c.run_id == run_id, metrics.c.seq == seq, metrics.c.key == key)
        .order_by(metrics.c.step, metrics.c.timestamp, metrics.c.id)
    )
    with store.engine.connect() as conn:
        rows: list[Any] = [tuple(r) for r in conn.execute(stmt)]
    kept = downsample(rows, max_points)
    return History(
        run_id=run_id,
        seq=seq,
        key=key,
        total=len(rows),
        downsampled=len(kept) < len(rows),
        points=[
            Point(step=rows[i][0], value=number(rows[i][1], rows[i][2]), timestamp=rows[i][3])
            for i in kept
        ],
    )


KeyQuery = Annotated[str, Query(min_length=1, max_length=250, description="The metric's key")]


@router.get("/runs/{run_id}/metrics/history", response_model=History)
def metric_history(
    run_id: str,
    key: KeyQuery,
    _: Viewer,
    store: Store,
    step: StepQuery = None,
    max_points: MaxPoints = 1000,
) -> History:
    """Every recorded point of one metric, in step order (downsampled past `max_points`)."""
    run = get_run_row(store, run_id)
    return history(store, run.id, _seq(store, run.id, step), key, max_points)


@router.get("/metrics/history", response_model=Histories)
def compare_histories(
    key: KeyQuery,
    _: Viewer,
    store: Store,
    run_id: Annotated[list[str], Query(min_length=1, max_length=50)],
    max_points: MaxPoints = 1000,
) -> Histories:
    """One metric of several runs, for charts that overlay them."""
    series = []
    for each in run_id:
        run = get_run_row(store, each)
        series.append(history(store, run.id, -1, key, max_points))
    return Histories(key=key, series=series)
