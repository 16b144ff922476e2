"""Logged models (MLflow 3): what `mlflow.<flavor>.log_model` creates, and what
`runs:/<run_id>/<name>` resolves to (through logged-models/search).

A logged model has an `m-<32 hex>` id, belongs to an experiment, usually names the
run that produced it, and keeps its files under
`mlflow-artifacts:/{experiment}/models/{model_id}/artifacts` (artifacts.py).
"""

from __future__ import annotations

import json
import time
import uuid
from functools import partial
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.server.mlflow import filtering
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
    key_values,
    list_arg,
    ms,
    not_found,
    pairs,
    reply,
    text_arg,
)
from keel.server.mlflow.data import check_tags
from keel.server.mlflow.experiments import get_row
from keel.server.mlflow.mapping import default_experiment, exp_in, exp_out, find
from keel.store.metadata import MetadataStore
from keel.store.schema import logged_models

router = APIRouter(route_class=MlflowRoute)
STATUSES = ("LOGGED_MODEL_PENDING", "LOGGED_MODEL_READY", "LOGGED_MODEL_UPLOAD_FAILED")


def location(exp: str, model_id: str) -> str:
    return f"mlflow-artifacts:/{exp}/models/{model_id}/artifacts"


def model_json(row: Any, exp: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "model_id": row.model_id,
        "experiment_id": exp,
        "name": row.name,
        "creation_timestamp_ms": ms(row.created_at),
        "last_updated_timestamp_ms": ms(row.updated_at),
        "artifact_uri": location(exp, row.model_id),
        "status": row.status,
        "tags": pairs(json.loads(row.tags) if row.tags else {}),
    }
    for key, value in (
        ("source_run_id", row.source_run_id),
        ("model_type", row.model_type),
        ("status_message", row.status_message),
    ):
        if value:
            info[key] = value
    params = json.loads(row.params) if row.params else {}
    return {"info": info, "data": {"params": pairs(params), "metrics": []}}


def get_model_row(store: MetadataStore, model_id: str) -> Any:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(logged_models).where(logged_models.c.model_id == model_id)
        ).first()
    if row is None or row.lifecycle_stage != "active":
        raise not_found(f"Logged model with ID '{model_id}' not found.")
    return row


def _answer(store: MetadataStore, model_id: str) -> Response:
    row = get_model_row(store, model_id)
    return reply({"model": model_json(row, exp_out(store, row.experiment_id))})


@router.post("/logged-models")
def create(args: Args, store: Store, principal: Operator) -> Response:
    keel_exp = exp_in(store, args.get("experiment_id") or "0")
    if get_row(store, keel_exp).lifecycle_stage != "active":
        raise invalid(f"The experiment {keel_exp} must be in the 'active' state")
    name = text_arg(args, "name", required=False).strip() or "model"
    if len(name) > 250:
        raise invalid("a logged model's name may have at most 250 characters")
    source = text_arg(args, "source_run_id", required=False)
    if source:
        find(store, source)
    tags = key_values(args, "tags")
    check_tags(tags)
    params = key_values(args, "params")
    model_id = f"m-{uuid.uuid4().hex}"
    now = time.time()
    with store.engine.begin() as conn:
        conn.execute(
            logged_models.insert().values(
                model_id=model_id,
                experiment_id=keel_exp,
                name=name,
                source_run_id=source or None,
                model_type=text_arg(args, "model_type", required=False)[:100] or None,
                status="LOGGED_MODEL_PENDING",
                tags=json.dumps(tags) if tags else None,
                params=json.dumps(params) if params else None,
                lifecycle_stage="active",
                created_by=principal.name,
                created_at=now,
                updated_at=now,
            )
        )
    return _answer(store, model_id)


@router.get("/logged-models/{model_id}")
def get(model_id: str, store: Store, _: Viewer) -> Response:
    return _answer(store, model_id)


def _change(store: MetadataStore, model_id: str, **values: Any) -> None:
    get_model_row(store, model_id)
    with store.engine.begin() as conn:
        conn.execute(
            logged_models.update()
            .where(logged_models.c.model_id == model_id)
            .values(updated_at=time.time(), **values)
        )


@router.patch("/logged-models/{model_id}")
def finalize(model_id: str, args: Args, store: Store, _: Operator) -> Response:
    status = text_arg(args, "status")
    if status not in STATUSES:
        raise invalid(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    _change(store, model_id, status=status)
    return _answer(store, model_id)


@router.delete("/logged-models/{model_id}")
def delete(model_id: str, store: Store, _: Operator) -> Response:
    _change(store, model_id, lifecycle_stage="deleted")
    return reply({})


def _merge(store: MetadataStore, model_id: str, column: str, given: dict[str, str]) -> None:
    row = get_model_row(store, model_id)
    current = json.loads(getattr(row, column) or "{}")
    current.update(given)
    _change(store, model_id, **{column: json.dumps(current) if current else None})


@router.patch("/logged-models/{model_id}/tags")
def set_tags(model_id: str, args: Args, store: Store, _: Operator) -> Response:
    tags = key_values(args, "tags")
    check_tags(tags)
    _merge(store, model_id, "tags", tags)
    return _answer(store, model_id)


@router.delete("/logged-models/{model_id}/tags/{key:path}")
def delete_tag(model_id: str, key: str, store: Store, _: Operator) -> Response:
    row = get_model_row(store, model_id)
    tags = json.loads(row.tags or "{}")
    if key not in tags:
        raise not_found(f"No tag with key {key!r} on logged model {model_id}")
    del tags[key]
    _change(store, model_id, tags=json.dumps(tags) if tags else None)
    return reply({})


@router.post("/logged-models/{model_id}/params")
def log_params(model_id: str, args: Args, store: Store, _: Operator) -> Response:
    _merge(store, model_id, "params", key_values(args, "params"))
    return reply({})


_ATTRIBUTES = {
    "name": "name",
    "model_id": "model_id",
    "source_run_id": "source_run_id",
    "status": "status",
    "model_type": "model_type",
    "creation_timestamp": "created_at",
    "creation_time": "created_at",
    "last_updated_timestamp": "updated_at",
}


def _lookup(row: Any, cond: filtering.Cond) -> Any:
    if cond.kind in ("tags", "params"):
        return json.loads(getattr(row, cond.kind) or "{}").get(cond.key)
    column = _ATTRIBUTES.get(cond.key) if cond.kind == "attr" else None
    if column is None:
        raise invalid(f"cannot search logged models by {cond.kind}.{cond.key}")
    value = getattr(row, column)
    return float(ms(value) or 0) if column.endswith("_at") else value


def _sort_value(column: str, row: Any) -> Any:
    return getattr(row, column) or ""


@router.post("/logged-models/search")
def search(args: Args, store: Store, _: Viewer) -> Response:
    wanted = [exp_in(store, e) for e in list_arg(args, "experiment_ids")]
    conds = filtering.parse(args.get("filter"))
    limit = int_arg(args, "max_results", 100, 50_000)
    offset = decode_token(args.get("page_token"))
    stmt = sa.select(logged_models).where(logged_models.c.lifecycle_stage == "active")
    if wanted:
        stmt = stmt.where(logged_models.c.experiment_id.in_(wanted))
    with store.engine.connect() as conn:
        rows = list(conn.execute(stmt))
    found = [r for r in rows if filtering.keep(conds, partial(_lookup, r))]
    found.sort(key=lambda r: (-r.created_at, r.model_id))
    for item in reversed(list_arg(args, "order_by")):
        field = item.get("field_name") if isinstance(item, dict) else None
        column = _ATTRIBUTES.get(str(field))
        if column is None:
            raise invalid(f"cannot order logged models by {field!r}")
        descending = not item.get("ascending", True)
        found.sort(key=partial(_sort_value, column), reverse=descending)
    page = found[offset : offset + limit]
    default = default_experiment(store)
    body: dict[str, Any] = {
        "models": [
            model_json(r, exp_out(store, r.experiment_id, default if default is not None else -1))
            for r in page
        ]
    }
    if offset + limit < len(found):
        body["next_page_token"] = encode_token(offset + limit)
    return reply(body)
