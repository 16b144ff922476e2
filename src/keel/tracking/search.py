"""`keel.search_runs`: find tracked runs by their params, metrics, tags and attributes.

    keel.search_runs("train", filter="metrics.accuracy > 0.9 and params.model = 'svc'",
                     order_by=["metrics.accuracy DESC"], max_results=10)

The filter (tracking/filters.py) becomes one SQL statement: each condition an EXISTS
against keel_latest_metrics / keel_params / keel_tags (or a test on a keel_runs
column), ordering and the limit in the same statement. Only the page of runs it
returns is then read in full (three more queries), so the cost follows the number
of runs returned, not the size of the store.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

from keel.errors import TrackingError
from keel.store.metadata import MetadataStore, open_store
from keel.store.recorder import recorder_for
from keel.store.schema import experiments as experiments_table
from keel.store.schema import latest_metrics, params, runs, steps, tags
from keel.tracking.filters import (
    BoolOp,
    Comparison,
    Expr,
    Field,
    OrderKey,
    parse_filter,
    parse_order_by,
)

RUN_COLUMNS = ("run_id", "experiment", "run_name", "status", "kind", "start_time", "end_time")
_CHUNK = 500  # ids per IN (...) when reading the page's params, metrics and tags


@dataclass(frozen=True)
class _Source:
    """The rows searched (runs, or runs and steps) and their attribute columns."""

    from_: sa.FromClause
    columns: dict[str, ColumnElement[Any]]
    seq: ColumnElement[Any] | int  # -1 when only runs are searched
    where: list[ColumnElement[bool]]


def _runs_only(experiment_ids: list[int] | None) -> _Source:
    where: list[ColumnElement[bool]] = [runs.c.lifecycle_stage == "active"]
    if experiment_ids is not None:
        where.append(runs.c.experiment_id.in_(experiment_ids))
    columns: dict[str, ColumnElement[Any]] = {
        "run_id": runs.c.id,
        "step_key": sa.cast(sa.null(), sa.String),
        "experiment_id": runs.c.experiment_id,
        "run_name": runs.c.run_name,
        "status": runs.c.status,
        "kind": runs.c.kind,
        "start_time": runs.c.started_at,
        "end_time": runs.c.ended_at,
        "user": runs.c.user,
    }
    return _Source(runs, columns, -1, where)


def _runs_and_steps(experiment_ids: list[int] | None) -> _Source:
    """Runs (seq -1) and their steps (nested runs, seq >= 0) as one set of rows."""
    base: list[ColumnElement[bool]] = [runs.c.lifecycle_stage == "active"]
    if experiment_ids is not None:
        base.append(runs.c.experiment_id.in_(experiment_ids))
    run_rows = sa.select(
        runs.c.id.label("run_id"),
        sa.literal_column("-1", sa.Integer).label("seq"),
        sa.cast(sa.null(), sa.String).label("step_key"),
        runs.c.experiment_id.label("experiment_id"),
        runs.c.run_name.label("run_name"),
        runs.c.status.label("status"),
        runs.c.kind.label("kind"),
        runs.c.started_at.label("start_time"),
        runs.c.ended_at.label("end_time"),
        runs.c.user.label("user"),
    ).where(*base)
    step_rows = (
        sa.select(
            steps.c.run_id,
            steps.c.seq,
            steps.c.key,
            runs.c.experiment_id,
            steps.c.task,
            steps.c.status,
            sa.literal_column("'step'", sa.String),
            steps.c.started_at,
            steps.c.ended_at,
            runs.c.user,
        )
        .select_from(steps.join(runs, runs.c.id == steps.c.run_id))
        .where(*base)
    )
    tracked = sa.union_all(run_rows, step_rows).subquery("tracked")
    columns: dict[str, ColumnElement[Any]] = {
        column.name: column for column in tracked.c if column.name != "seq"
    }
    return _Source(tracked, columns, tracked.c.seq, [])


# -- conditions -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dialect:
    name: str

    def text(self, column: ColumnElement[Any]) -> ColumnElement[Any]:
        """Text compared and sorted by code point on every database, as SQLite does."""
        return sa.collate(column, "C") if self.name == "postgresql" else column


def _like_parts(pattern: str) -> list[tuple[str, str]]:
    """A LIKE pattern as (kind, char) pieces: ('any', '%'), ('one', '_'), ('lit', c).
    A backslash makes the next character literal (\\% is a percent sign)."""
    parts: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            parts.append(("lit", pattern[i + 1]))
            i += 2
            continue
        if ch == "%":
            parts.append(("any", ch))
        elif ch == "_":
            parts.append(("one", ch))
        else:
            parts.append(("lit", ch))
        i += 1
    return parts


def _like_sql_pattern(parts: list[tuple[str, str]]) -> str:
    out = []
    for kind, ch in parts:
        if kind == "lit" and ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _glob_pattern(parts: list[tuple[str, str]]) -> str:
    out = []
    for kind, ch in parts:
        if kind == "any":
            out.append("*")
        elif kind == "one":
            out.append("?")
        elif ch in "*?[":
            out.append(f"[{ch}]")
        else:
            out.append(ch)
    return "".join(out)


def _text_condition(
    column: ColumnElement[Any], op: str, value: Any, dialect: _Dialect
) -> ColumnElement[bool]:
    negate = op.startswith("not ")
    base = op.removeprefix("not ")
    cond: ColumnElement[bool]
    if base == "in":
        cond = column.in_(list(value))
    elif base == "like":
        parts = _like_parts(str(value))
        if dialect.name == "sqlite":
            # SQLite's LIKE ignores case; GLOB is its case-sensitive match.
            cond = column.op("GLOB", is_comparison=True)(_glob_pattern(parts))
        else:
            cond = column.like(_like_sql_pattern(parts), escape="\\")
    elif base == "ilike":
        cond = column.ilike(_like_sql_pattern(_like_parts(str(value))), escape="\\")
    else:
        cond = _compare(dialect.text(column), op, value)
    return sa.not_(cond) if negate else cond


_COMPARE = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _compare(column: ColumnElement[Any], op: str, value: Any) -> ColumnElement[bool]:
    result: ColumnElement[bool] = _COMPARE[op](column, value)
    return result


def _condition(expr: Expr, source: _Source, dialect: _Dialect) -> ColumnElement[bool]:
    if isinstance(expr, BoolOp):
        items = [_condition(item, source, dialect) for item in expr.items]
        return sa.and_(*items) if expr.op == "and" else sa.or_(*items)
    return _comparison(expr, source, dialect)


def _comparison(cmp: Comparison, source: _Source, dialect: _Dialect) -> ColumnElement[bool]:
    field = cmp.field
    if field.entity == "attributes":
        column = source.columns[field.key]
        if field.key in ("start_time", "end_time"):
            return _compare(column, cmp.op, cmp.value)
        return _text_condition(column, cmp.op, cmp.value, dialect)
    run_id = source.columns["run_id"]
    if field.entity == "metrics":
        value = float(cmp.value)  # type: ignore[arg-type]
        matches = _compare(latest_metrics.c.value, cmp.op, value)
        if cmp.op == "!=":
            matches = sa.or_(matches, latest_metrics.c.is_nan)  # NaN differs from every number
        return sa.exists().where(
            latest_metrics.c.run_id == run_id,
            latest_metrics.c.seq == source.seq,
            latest_metrics.c.key == field.key,
            matches,
        )
    table = params if field.entity == "params" else tags
    return sa.exists().where(
        table.c.run_id == run_id,
        table.c.seq == source.seq,
        table.c.key == field.key,
        _text_condition(table.c.value, cmp.op, cmp.value, dialect),
    )


def _order_column(field: Field, source: _Source, dialect: _Dialect) -> ColumnElement[Any]:
    if field.entity == "attributes":
        column = source.columns[field.key]
        if field.key in ("start_time", "end_time"):
            return column
        return dialect.text(column)
    table = {"metrics": latest_metrics, "params": params, "tags": tags}[field.entity]
    value = (
        sa.select(table.c.value)
        .where(
            table.c.run_id == source.columns["run_id"],
            table.c.seq == source.seq,
            table.c.key == field.key,
        )
        .scalar_subquery()
    )
    return value if field.entity == "metrics" else dialect.text(value)


# -- the search --------------------------------------------------------------------------


def _experiment_ids(
    store: MetadataStore, experiments: str | int | Iterable[str | int] | None
) -> list[int] | None:
    if experiments is None:
        return None
    wanted = [experiments] if isinstance(experiments, str | int) else list(experiments)
    with store.engine.connect() as conn:
        known = {r.name: r.id for r in conn.execute(sa.select(experiments_table))}
    ids: list[int] = []
    for item in wanted:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise TrackingError(
                f"experiments must be names (or ids), got {item!r}",
                hint="Pass a name, a list of names, or None for every experiment",
            )
        if isinstance(item, int):
            if item not in known.values():
                raise TrackingError(f"no experiment with id {item}")
            ids.append(item)
            continue
        if item not in known:
            shown = ", ".join(sorted(known)[:10]) or "none yet"
            raise TrackingError(
                f"no experiment named {item!r}",
                hint=f"Known experiments: {shown} (see `keel experiments ls`)",
            )
        ids.append(known[item])
    return ids


def _check_args(max_results: Any, output_format: Any, order_by: Any) -> None:
    if isinstance(max_results, bool) or not isinstance(max_results, int) or max_results < 1:
        raise TrackingError(f"max_results must be a whole number >= 1, got {max_results!r}")
    if output_format not in ("pandas", "list"):
        raise TrackingError(f"output_format must be 'pandas' or 'list', got {output_format!r}")
    if order_by is not None and not isinstance(order_by, list | tuple):
        raise TrackingError(
            f"order_by must be a list of strings, got {order_by!r}",
            hint="e.g. order_by=['metrics.accuracy DESC']",
        )


def build_query(
    store: MetadataStore,
    *,
    experiment_ids: list[int] | None,
    expr: Expr | None,
    keys: Sequence[OrderKey],
    max_results: int,
    include_steps: bool,
) -> sa.Select[Any]:
    """The SQL that finds the page of runs (their attribute columns, in order)."""
    source = _runs_and_steps(experiment_ids) if include_steps else _runs_only(experiment_ids)
    dialect = _Dialect(store.dialect)
    where = list(source.where)
    if expr is not None:
        where.append(_condition(expr, source, dialect))
    c = source.columns
    only_runs = isinstance(source.seq, int)
    seq: ColumnElement[Any] = (
        source.seq if not isinstance(source.seq, int) else sa.literal_column("-1", sa.Integer)
    )
    order: list[Any] = []
    for key in keys:
        column = _order_column(key.field, source, dialect)
        order.append((column.desc() if key.descending else column.asc()).nulls_last())
    # Ties (and no order_by at all): newest first, then by id, a run before its steps.
    order += [c["start_time"].desc().nulls_last(), c["run_id"].desc()]
    if not only_runs:
        order.append(seq.asc())
    return (
        sa.select(
            c["run_id"].label("run_id"),
            seq.label("seq"),
            c["step_key"].label("step_key"),
            c["experiment_id"].label("experiment_id"),
            c["run_name"].label("run_name"),
            c["status"].label("status"),
            c["kind"].label("kind"),
            c["start_time"].label("start_time"),
            c["end_time"].label("end_time"),
        )
        .select_from(source.from_)
        .where(*where)
        .order_by(*order)
        .limit(max_results)
    )


def _details(
    store: MetadataStore, keys: list[tuple[str, int]], include_steps: bool
) -> tuple[dict[tuple[str, int], dict[str, Any]], ...]:
    """Params, latest metrics and tags of the given (run_id, seq) rows."""
    wanted = set(keys)
    run_ids = sorted({run_id for run_id, _ in keys})
    found: tuple[dict[tuple[str, int], dict[str, Any]], ...] = ({}, {}, {})
    with store.engine.connect() as conn:
        for start in range(0, len(run_ids), _CHUNK):
            chunk = run_ids[start : start + _CHUNK]
            for out, table in zip(found, (params, latest_metrics, tags), strict=True):
                columns = [table.c.run_id, table.c.seq, table.c.key, table.c.value]
                if table is latest_metrics:
                    columns.append(table.c.is_nan)
                stmt = sa.select(*columns).where(table.c.run_id.in_(chunk))
                if not include_steps:
                    stmt = stmt.where(table.c.seq == -1)
                is_metric = table is latest_metrics
                for row in conn.execute(stmt).all():
                    key = (row[0], row[1])
                    if key not in wanted:
                        continue
                    value = row[3]
                    if is_metric and (row[4] or value is None):
                        value = math.nan
                    holder = out.get(key)
                    if holder is None:
                        holder = out[key] = {}
                    holder[row[2]] = value
    return found


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def search_runs(
    experiments: str | int | Iterable[str | int] | None = None,
    filter: str = "",
    order_by: list[str] | None = None,
    max_results: int = 1000,
    output_format: Literal["pandas", "list"] = "pandas",
    include_steps: bool = False,
) -> Any:
    """Find tracked runs; a pandas DataFrame (default) or a list of dicts.

    experiments: an experiment name, a list of names, or None for every experiment.
    filter: conditions on metrics (latest values), params, tags and attributes, e.g.
        "metrics.accuracy > 0.9 and params.model = 'svc'" (grammar in docs/tracking.md).
    order_by: e.g. ["metrics.accuracy DESC", "params.model"]; runs without the key
        come last. By default the newest run comes first.
    include_steps: steps (the nested runs of workflow runs) are rows too, with their
        `step_key`; run_name is then the task's name and kind 'step'.

    DataFrame columns: run_id, experiment, run_name, status, kind, start_time, end_time
    (UTC), then `params.<key>`, `metrics.<key>` and `tags.<key>` (pandas' NA where a
    run lacks the key).
    With output_format="list", each record has those run columns and `params`,
    `metrics` and `tags` dicts holding only the keys the run has.
    """
    _check_args(max_results, output_format, order_by)
    # A bad filter fails here, before the store is touched.
    expr = parse_filter(filter)
    order_keys = [parse_order_by(item) for item in order_by or ()]
    store = open_store()
    # What this process logged and has not committed yet is part of the answer.
    recorder_for(store).flush()
    ids = _experiment_ids(store, experiments)
    stmt = build_query(
        store,
        experiment_ids=ids,
        expr=expr,
        keys=order_keys,
        max_results=max_results,
        include_steps=include_steps,
    )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
        names = {r.id: r.name for r in conn.execute(sa.select(experiments_table))}
    keys = [(r.run_id, int(r.seq)) for r in rows]
    found_params, found_metrics, found_tags = _details(store, keys, include_steps)
    records: list[dict[str, Any]] = []
    for row, key in zip(rows, keys, strict=True):
        record: dict[str, Any] = {"run_id": row.run_id}
        if include_steps:
            record["step_key"] = row.step_key
        record.update(
            experiment=names.get(row.experiment_id),
            run_name=row.run_name,
            status=row.status,
            kind=row.kind,
            start_time=_when(row.start_time),
            end_time=_when(row.end_time),
            params=found_params.get(key, {}),
            metrics=found_metrics.get(key, {}),
            tags=found_tags.get(key, {}),
        )
        records.append(record)
    if output_format == "list":
        return records
    return _frame(records, include_steps)


def _frame(records: list[dict[str, Any]], include_steps: bool) -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise TrackingError(
            "search_runs needs pandas to return a DataFrame",
            hint="pip install 'keel[data]', or pass output_format='list'",
        ) from None
    fixed = list(RUN_COLUMNS)
    if include_steps:
        fixed.insert(1, "step_key")
    wide: dict[str, list[Any]] = {name: [r[name] for r in records] for name in fixed}
    for group, missing in (("params", None), ("metrics", math.nan), ("tags", None)):
        names = sorted({k for r in records for k in r[group]})
        for name in names:
            wide[f"{group}.{name}"] = [r[group].get(name, missing) for r in records]
    frame = pd.DataFrame(wide, columns=list(wide))
    for name in ("start_time", "end_time"):
        frame[name] = pd.to_datetime(frame[name], utc=True)
    return frame
