"""Params, metrics and tags of runs: log-metric, log-parameter, log-batch, set-tag,
delete-tag, metrics/get-history.

Rows go to the same tables, with the same checks, as keel.log_param / log_metric /
set_tag, in one transaction per request: a request is recorded whole or not at all.
A param cannot change once logged (400 INVALID_PARAMETER_VALUE, as MLflow answers).
"""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.server.mlflow.common import (
    Args,
    MlflowRoute,
    Operator,
    Store,
    Viewer,
    decode_token,
    encode_token,
    int_arg,
    invalid,
    list_arg,
    ms,
    not_found,
    number,
    reply,
    seconds,
    text_arg,
    whole,
)
from keel.server.mlflow.mapping import NAME_TAG, PARENT_TAG, USER_TAG, Tracked, find
from keel.store.metadata import Batch, MetadataStore
from keel.store.schema import metrics, params, tags
from keel.store.tracking import (
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    MAX_TAG_LENGTH,
    load_metric_history,
)

router = APIRouter(route_class=MlflowRoute)

# The most one log-batch may carry (the limits MLflow's client splits batches by).
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS_TAGS = 100
MAX_BATCH_ENTITIES = 1000


def writable(store: MetadataStore, mlflow_id: str) -> Tracked:
    found = find(store, mlflow_id)
    if found.lifecycle != "active":
        raise invalid(
            f"The run {mlflow_id} must be in the 'active' state. "
            f"Current state is {found.lifecycle}."
        )
    return found


def check_key(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise invalid(f"{kind} key {key!r} must be a string of 1 to {MAX_KEY_LENGTH} characters")
    if key.startswith("/") or ".." in key.split("/"):
        raise invalid(f"{kind} key {key!r} may not start with '/' or contain '..'")
    return key


def check_tags(values: dict[str, str]) -> None:
    for key, value in values.items():
        check_key("tag", key)
        if len(value) > MAX_TAG_LENGTH:
            raise invalid(f"tag {key!r} is {len(value)} characters long; the limit is 8000")


def metric_row(t: Tracked, item: Any) -> tuple[Any, ...]:
    if not isinstance(item, dict):
        raise invalid("each metric must be an object with key, value, timestamp and step")
    key = check_key("metric", item.get("key"))
    raw = item.get("value")
    if isinstance(raw, bool) or raw is None:
        raise invalid(f"metric {key!r} needs a numeric value, got {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"metric {key!r} needs a numeric value, got {raw!r}") from None
    try:
        step = int(item.get("step") or 0)
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"metric {key!r}: step must be a whole number") from None
    whole(step, f"metric {key!r}: step")
    at = seconds(item.get("timestamp"), f"metric {key!r}: timestamp")
    is_nan = math.isnan(value)
    return (t.run_id, t.seq, key, None if is_nan else value, is_nan, step, at or time.time())


def _known(store: MetadataStore, t: Tracked, rows: list[tuple[Any, ...]]) -> set[tuple[Any, ...]]:
    """Which of these metric points are recorded already (same key, step, time, value)."""
    if not rows:
        return set()
    stmt = sa.select(metrics.c.key, metrics.c.step, metrics.c.timestamp, metrics.c.value).where(
        metrics.c.run_id == t.run_id,
        metrics.c.seq == t.seq,
        metrics.c.key.in_(sorted({r[2] for r in rows})),
        metrics.c.step.in_(sorted({r[5] for r in rows})),
    )
    with store.engine.connect() as conn:
        return {(r.key, r.step, ms(r.timestamp), r.value) for r in conn.execute(stmt)}


def _new_points(store: MetadataStore, t: Tracked, items: list[Any]) -> list[tuple[Any, ...]]:
    """The metric rows to insert. MLflow 3's log_model logs a run's metrics again, each
    with the logged model's id: a point already recorded is not recorded twice."""
    rows = [metric_row(t, m) for m in items]
    again = [r for r, m in zip(rows, items, strict=True) if m.get("model_id")]
    known = _known(store, t, again)
    if not known:
        return rows
    return [r for r in rows if (r[2], r[5], ms(r[6]), r[3]) not in known]


def _checked_params(store: MetadataStore, t: Tracked, given: dict[str, str]) -> dict[str, str]:
    """The params to insert: new keys; the same value again is fine, another is an error."""
    for key, value in given.items():
        check_key("param", key)
        if len(value) > MAX_PARAM_LENGTH:
            raise invalid(f"param {key!r} is {len(value)} characters long; the limit is 6000")
    if not given:
        return {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(params.c.key, params.c.value).where(
                params.c.run_id == t.run_id, params.c.seq == t.seq, params.c.key.in_(list(given))
            )
        )
        logged = {r.key: r.value for r in rows}
    for key, old in logged.items():
        if old != given[key]:
            raise invalid(
                f"Changing param values is not allowed. Param with key='{key}' was already "
                f"logged with value='{old}' for run ID='{t.mlflow_id}'. "
                f"Attempted logging new value '{given[key]}'."
            )
    return {k: v for k, v in given.items() if k not in logged}


def _run_fields(store: MetadataStore, t: Tracked, values: dict[str, str]) -> dict[str, Any]:
    """keel columns for the tags that are run fields (name, user, parent)."""
    fields: dict[str, Any] = {}
    if t.seq >= 0:
        return fields
    if NAME_TAG in values:
        fields["run_name"] = values[NAME_TAG][:250]
    if USER_TAG in values:
        fields["user"] = values[USER_TAG][:100]
    if PARENT_TAG in values:
        parent = find(store, values[PARENT_TAG])
        fields["parent_id"] = parent.run_id
        fields["parent_seq"] = parent.seq if parent.seq >= 0 else None
    return fields


def record(
    store: MetadataStore,
    t: Tracked,
    *,
    points: list[Any] | None = None,
    given_params: dict[str, str] | None = None,
    given_tags: dict[str, str] | None = None,
) -> None:
    """Check everything, then write it in one transaction."""
    batch = Batch()
    batch.metrics = _new_points(store, t, points or [])
    latest: dict[str, tuple[Any, ...]] = {}
    for row in batch.metrics:
        seen = latest.get(row[2])
        if seen is None or (row[5], row[6]) >= (seen[5], seen[6]):
            latest[row[2]] = row
    batch.latest_metrics = list(latest.values())
    new_params = _checked_params(store, t, given_params or {})
    batch.params = [(t.run_id, t.seq, k, v) for k, v in new_params.items()]
    given_tags = given_tags or {}
    check_tags(given_tags)
    fields = _run_fields(store, t, given_tags)
    plain = {k: v for k, v in given_tags.items() if k not in (NAME_TAG, USER_TAG, PARENT_TAG)}
    batch.tags = [(t.run_id, t.seq, k, v) for k, v in plain.items()]
    if fields:
        batch.run_updates[t.run_id] = fields
    if batch:
        store.write_batch(batch)


@router.post("/runs/log-metric")
def log_metric(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    record(store, t, points=[args])
    return reply({})


@router.post("/runs/log-parameter")
def log_parameter(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    key = text_arg(args, "key")
    record(store, t, given_params={key: text_arg(args, "value", required=False)})
    return reply({})


def _pairs(args: dict[str, Any], name: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in list_arg(args, name):
        if not isinstance(item, dict) or "key" not in item:
            raise invalid(f"each of {name} must be an object with key and value")
        key = check_key(name.rstrip("s"), item["key"])
        value = "" if item.get("value") is None else str(item["value"])
        if name == "params" and key in out and out[key] != value:
            raise invalid(f"param {key!r} is given twice with different values in one batch")
        out[key] = value
    return out


@router.post("/runs/log-batch")
def log_batch(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    points = list_arg(args, "metrics")
    batch_params = _pairs(args, "params")
    batch_tags = _pairs(args, "tags")
    if len(points) > MAX_BATCH_METRICS:
        raise invalid(f"A batch logging request can contain at most {MAX_BATCH_METRICS} metrics")
    for what, given in (("params", batch_params), ("tags", batch_tags)):
        if len(given) > MAX_BATCH_PARAMS_TAGS:
            raise invalid(
                f"A batch logging request can contain at most {MAX_BATCH_PARAMS_TAGS} {what}"
            )
    if len(points) + len(batch_params) + len(batch_tags) > MAX_BATCH_ENTITIES:
        raise invalid(
            f"A batch logging request can contain at most {MAX_BATCH_ENTITIES} "
            "metrics, params and tags in total"
        )
    record(store, t, points=points, given_params=batch_params, given_tags=batch_tags)
    return reply({})


@router.post("/runs/set-tag")
def set_tag(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    key = check_key("tag", text_arg(args, "key"))
    record(store, t, given_tags={key: text_arg(args, "value", required=False)})
    return reply({})


@router.post("/runs/delete-tag")
def delete_tag(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    key = text_arg(args, "key")
    with store.engine.begin() as conn:
        gone = conn.execute(
            tags.delete().where(tags.c.run_id == t.run_id, tags.c.seq == t.seq, tags.c.key == key)
        ).rowcount
    if not gone:
        raise not_found(f"No tag with name: {key} in run with id {t.mlflow_id}")
    return reply({})


@router.get("/metrics/get-history")
def get_history(args: Args, store: Store, _: Viewer) -> Response:
    t = find(store, text_arg(args, "run_id", "run_uuid"))
    key = text_arg(args, "metric_key")
    limit = int_arg(args, "max_results", 25_000, 25_000)
    offset = decode_token(args.get("page_token"))
    points = load_metric_history(store, t.run_id, t.seq, key)
    page = points[offset : offset + limit]
    body: dict[str, Any] = {
        "metrics": [
            {"key": p.key, "value": number(p.value), "timestamp": ms(p.timestamp), "step": p.step}
            for p in page
        ]
    }
    if offset + limit < len(points):
        body["next_page_token"] = encode_token(offset + limit)
    return reply(body)
