"""runs/search: keel's filter grammar and SQL (tracking/filters.py, tracking/search.py)
over runs and their steps, seen as MLflow runs.

What differs from keel.search_runs: steps are rows too (nested runs with ids
`<run_id>-<seq>`), times are epoch milliseconds, the tags mlflow.runName /
mlflow.user / mlflow.parentRunId are the run's name, user and parent, and deleted
runs can be asked for (run_view_type).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from keel.server.mlflow.mapping import NAME_TAG, PARENT_TAG, USER_TAG, Tracked
from keel.store.metadata import MetadataStore
from keel.store.schema import runs, steps
from keel.tracking import search as keel_search
from keel.tracking.filters import BoolOp, Comparison, Expr, OrderKey

_STEP_STATUS = {"CACHED": "SUCCEEDED", "SKIPPED": "CANCELLED"}
_TAG_COLUMNS = {NAME_TAG: "run_name", USER_TAG: "user", PARENT_TAG: "parent"}


def _source(experiment_ids: list[int] | None, view: str) -> keel_search._Source:
    where: list[ColumnElement[bool]] = []
    if experiment_ids is not None:
        where.append(runs.c.experiment_id.in_(experiment_ids))
    if view != "ALL":
        stage = "deleted" if view == "DELETED_ONLY" else "active"
        where.append(runs.c.lifecycle_stage == stage)
    parent = sa.case(
        (runs.c.parent_seq.is_(None), runs.c.parent_id),
        else_=runs.c.parent_id + "-" + sa.cast(runs.c.parent_seq, sa.String),
    )
    run_rows = sa.select(
        runs.c.id.label("run_id"),
        sa.literal_column("-1", sa.Integer).label("seq"),
        runs.c.id.label("mlflow_id"),
        sa.cast(sa.null(), sa.String).label("step_key"),
        runs.c.experiment_id.label("experiment_id"),
        sa.func.coalesce(runs.c.run_name, runs.c.workflow).label("run_name"),
        runs.c.status.label("status"),
        runs.c.kind.label("kind"),
        sa.func.coalesce(runs.c.started_at, runs.c.created_at).label("start_time"),
        runs.c.ended_at.label("end_time"),
        runs.c.user.label("user"),
        runs.c.lifecycle_stage.label("lifecycle"),
        parent.label("parent"),
    ).where(*where)
    status = sa.case(
        *((steps.c.status == k, v) for k, v in _STEP_STATUS.items()), else_=steps.c.status
    )
    step_rows = (
        sa.select(
            steps.c.run_id,
            steps.c.seq,
            steps.c.run_id + "-" + sa.cast(steps.c.seq, sa.String),
            steps.c.key,
            runs.c.experiment_id,
            steps.c.key,
            status,
            sa.literal_column("'step'", sa.String),
            steps.c.started_at,
            steps.c.ended_at,
            runs.c.user,
            runs.c.lifecycle_stage,
            steps.c.run_id,
        )
        .select_from(steps.join(runs, runs.c.id == steps.c.run_id))
        .where(*where)
    )
    tracked = sa.union_all(run_rows, step_rows).subquery("tracked")
    columns: dict[str, ColumnElement[Any]] = {c.name: c for c in tracked.c if c.name != "seq"}
    return keel_search._Source(tracked, columns, tracked.c.seq, [])


def _condition(
    expr: Expr, source: keel_search._Source, dialect: keel_search._Dialect
) -> ColumnElement[bool]:
    if isinstance(expr, BoolOp):
        items = [_condition(item, source, dialect) for item in expr.items]
        return sa.and_(*items) if expr.op == "and" else sa.or_(*items)
    return _comparison(expr, source, dialect)


def _comparison(
    cmp: Comparison, source: keel_search._Source, dialect: keel_search._Dialect
) -> ColumnElement[bool]:
    field = cmp.field
    if field.entity == "attributes" and field.key == "run_id":
        return keel_search._text_condition(source.columns["mlflow_id"], cmp.op, cmp.value, dialect)
    if field.entity == "attributes" and field.key in ("start_time", "end_time"):
        value = float(cmp.value) / 1000.0  # type: ignore[arg-type]
        return keel_search._compare(source.columns[field.key], cmp.op, value)
    if field.entity == "tags" and field.key in _TAG_COLUMNS:
        column = source.columns[_TAG_COLUMNS[field.key]]
        return keel_search._text_condition(column, cmp.op, cmp.value, dialect)
    return keel_search._comparison(cmp, source, dialect)


def _order(
    key: OrderKey, source: keel_search._Source, dialect: keel_search._Dialect
) -> ColumnElement[Any]:
    field = key.field
    column: ColumnElement[Any]
    if field.entity == "attributes" and field.key == "run_id":
        column = dialect.text(source.columns["mlflow_id"])
    elif field.entity == "tags" and field.key in _TAG_COLUMNS:
        column = dialect.text(source.columns[_TAG_COLUMNS[field.key]])
    else:
        column = keel_search._order_column(field, source, dialect)
    return (column.desc() if key.descending else column.asc()).nulls_last()


def find(
    store: MetadataStore,
    *,
    experiment_ids: list[int] | None,
    view: str,
    expr: Expr | None,
    order: list[OrderKey],
    offset: int,
    limit: int,
) -> list[Tracked]:
    """One page of runs (and steps) in order; `limit` rows at most."""
    source = _source(experiment_ids, view)
    dialect = keel_search._Dialect(store.dialect)
    c = source.columns
    stmt = sa.select(source.from_)
    if expr is not None:
        stmt = stmt.where(_condition(expr, source, dialect))
    ordering = [_order(k, source, dialect) for k in order]
    ordering += [c["start_time"].desc().nulls_last(), c["run_id"].desc(), source.seq.asc()]  # type: ignore[union-attr]
    stmt = stmt.order_by(*ordering).offset(offset).limit(limit)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        Tracked(
            mlflow_id=r.mlflow_id,
            run_id=r.run_id,
            seq=int(r.seq),
            experiment_id=r.experiment_id,
            name=r.run_name,
            status=r.status,
            kind=r.kind,
            start=r.start_time,
            end=r.end_time,
            user=r.user,
            lifecycle=r.lifecycle,
            parent=r.parent,
        )
        for r in rows
    ]


def order_key(text: str) -> str:
    """MLflow allows a bare attribute name in order_by ('start_time DESC')."""
    head = text.strip().split(" ", 1)[0]
    return text if "." in head or "`" in head else f"attributes.{text.strip()}"
