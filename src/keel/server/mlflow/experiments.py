"""Experiments: create, get, get-by-name, search, update, delete and restore, tags.

Deleting an experiment is a soft delete (it stays readable with lifecycle_stage
"deleted") and, as in MLflow, marks its runs deleted too; restoring brings both back.
"""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.server.mlflow import filtering
from keel.server.mlflow.common import (
    Args,
    MlflowError,
    MlflowRoute,
    Operator,
    Store,
    Viewer,
    decode_token,
    encode_token,
    int_arg,
    invalid,
    key_values,
    ms,
    not_found,
    pairs,
    reply,
    text_arg,
)
from keel.server.mlflow.mapping import DEFAULT_ID, artifact_root, exp_in, exp_out
from keel.store.metadata import MetadataStore
from keel.store.schema import experiments, runs
from keel.store.tracking import MAX_KEY_LENGTH, MAX_TAG_LENGTH

router = APIRouter(route_class=MlflowRoute)
VIEW_TYPES = {"1": "ACTIVE_ONLY", "2": "DELETED_ONLY", "3": "ALL"}


def experiment_json(row: Any, exp: str) -> dict[str, Any]:
    tags = json.loads(row.tags) if row.tags else {}
    return {
        "experiment_id": exp,
        "name": row.name,
        "artifact_location": artifact_root(exp),
        "lifecycle_stage": row.lifecycle_stage,
        "creation_time": ms(row.created_at),
        "last_update_time": ms(row.updated_at),
        "tags": pairs(tags),
    }


def get_row(store: MetadataStore, keel_id: int) -> Any:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(experiments).where(experiments.c.id == keel_id)).first()
    if row is None:
        raise not_found(f"No Experiment with id={keel_id} exists")
    return row


def view_type(value: Any) -> str:
    text = str(value or "ACTIVE_ONLY").upper()
    text = VIEW_TYPES.get(text, text)
    if text not in VIEW_TYPES.values():
        raise invalid(f"view type must be ACTIVE_ONLY, DELETED_ONLY or ALL, got {value!r}")
    return text


def lifecycle_matches(stage: str, view: str) -> bool:
    return view == "ALL" or (stage == "deleted") == (view == "DELETED_ONLY")


def _check_tags(tags: dict[str, str]) -> None:
    for key, value in tags.items():
        if not key or len(key) > MAX_KEY_LENGTH:
            raise invalid(f"tag key {key[:60]!r} must have 1 to {MAX_KEY_LENGTH} characters")
        if len(value) > MAX_TAG_LENGTH:
            raise invalid(f"tag {key!r} is longer than {MAX_TAG_LENGTH} characters")


@router.post("/experiments/create")
def create(args: Args, store: Store, _: Operator) -> Response:
    name = text_arg(args, "name").strip()
    if not name or len(name) > 250:
        raise invalid("an experiment name must have 1 to 250 characters")
    tags = key_values(args, "tags")
    _check_tags(tags)
    now = time.time()
    try:
        with store.engine.begin() as conn:
            new_id = conn.execute(
                experiments.insert().values(
                    name=name,
                    lifecycle_stage="active",
                    tags=json.dumps(tags) if tags else None,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key
    except sa.exc.IntegrityError:
        raise MlflowError(
            "RESOURCE_ALREADY_EXISTS", f"Experiment(name={name}) already exists."
        ) from None
    assert new_id is not None
    return reply({"experiment_id": exp_out(store, int(new_id[0]))})


@router.get("/experiments/get")
def get(args: Args, store: Store, _: Viewer) -> Response:
    mlflow_id = text_arg(args, "experiment_id")
    row = get_row(store, exp_in(store, mlflow_id))
    return reply({"experiment": experiment_json(row, exp_out(store, row.id))})


@router.get("/experiments/get-by-name")
def get_by_name(args: Args, store: Store, _: Viewer) -> Response:
    name = text_arg(args, "experiment_name")
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(experiments).where(experiments.c.name == name)).first()
    if row is None:
        raise not_found(f"Could not find experiment with name '{name}'")
    return reply({"experiment": experiment_json(row, exp_out(store, row.id))})


_ORDER = {
    "name": lambda r: r.name,
    "experiment_id": lambda r: r.id,
    "creation_time": lambda r: r.created_at,
    "last_update_time": lambda r: r.updated_at,
}


def _attribute(row: Any, key: str, exp: str) -> Any:
    if key == "name":
        return row.name
    if key == "experiment_id":
        return exp
    if key in ("creation_time", "last_update_time"):
        return float(ms(row.created_at if key == "creation_time" else row.updated_at) or 0)
    raise invalid(f"cannot filter experiments on {key!r}: use name, tags.<key> or creation_time")


def _lookup(row: Any, tags: dict[str, str], exp: str, cond: filtering.Cond) -> Any:
    return tags.get(cond.key) if cond.kind == "tags" else _attribute(row, cond.key, exp)


def _sort_value(key: str, pair: tuple[Any, str]) -> Any:
    return _ORDER[key](pair[0])


@router.api_route("/experiments/search", methods=["GET", "POST"])
def search(args: Args, store: Store, _: Viewer) -> Response:
    view = view_type(args.get("view_type"))
    conds = filtering.parse(args.get("filter"))
    limit = int_arg(args, "max_results", 1000, 50_000)
    offset = decode_token(args.get("page_token"))
    with store.engine.connect() as conn:
        rows = list(conn.execute(sa.select(experiments)))
    default = next((r.id for r in rows if r.name == "Default"), None)
    found = []
    for row in rows:
        exp = exp_out(store, row.id, default if default is not None else -1)
        if not lifecycle_matches(row.lifecycle_stage, view):
            continue
        tags = json.loads(row.tags) if row.tags else {}

        if filtering.keep(conds, partial(_lookup, row, tags, exp)):
            found.append((row, exp))
    found.sort(key=lambda item: (-item[0].created_at, item[0].id))
    for item in reversed(_order_keys(args)):
        key, descending = item
        found.sort(key=partial(_sort_value, key), reverse=descending)
    page = found[offset : offset + limit]
    body: dict[str, Any] = {"experiments": [experiment_json(r, e) for r, e in page]}
    if offset + limit < len(found):
        body["next_page_token"] = encode_token(offset + limit)
    return reply(body)


def _order_keys(args: dict[str, Any]) -> list[tuple[str, bool]]:
    out = []
    items = args.get("order_by") or []
    for item in items if isinstance(items, list) else [items]:
        words = str(item).split()
        key = words[0].removeprefix("attributes.").removeprefix("attribute.") if words else ""
        if key not in _ORDER or len(words) > 2:
            raise invalid(f"cannot order experiments by {item!r}")
        out.append((key, len(words) == 2 and words[1].upper() == "DESC"))
    return out


def _update(store: MetadataStore, mlflow_id: str, **values: Any) -> Any:
    keel_id = exp_in(store, mlflow_id)
    row = get_row(store, keel_id)
    with store.engine.begin() as conn:
        conn.execute(
            experiments.update()
            .where(experiments.c.id == keel_id)
            .values(updated_at=time.time(), **values)
        )
    return row


def _set_stage(store: MetadataStore, mlflow_id: str, stage: str) -> Response:
    if stage == "deleted" and mlflow_id == DEFAULT_ID:
        raise invalid("The default experiment cannot be deleted")
    row = _update(store, mlflow_id, lifecycle_stage=stage)
    with store.engine.begin() as conn:
        conn.execute(
            runs.update().where(runs.c.experiment_id == row.id).values(lifecycle_stage=stage)
        )
    return reply({})


@router.post("/experiments/delete")
def delete(args: Args, store: Store, _: Operator) -> Response:
    return _set_stage(store, text_arg(args, "experiment_id"), "deleted")


@router.post("/experiments/restore")
def restore(args: Args, store: Store, _: Operator) -> Response:
    return _set_stage(store, text_arg(args, "experiment_id"), "active")


@router.post("/experiments/update")
def update(args: Args, store: Store, _: Operator) -> Response:
    new_name = text_arg(args, "new_name").strip()
    if not new_name or len(new_name) > 250:
        raise invalid("an experiment name must have 1 to 250 characters")
    try:
        _update(store, text_arg(args, "experiment_id"), name=new_name)
    except sa.exc.IntegrityError:
        raise MlflowError(
            "RESOURCE_ALREADY_EXISTS", f"Experiment(name={new_name}) already exists."
        ) from None
    return reply({})


def _change_tags(store: MetadataStore, args: dict[str, Any], key: str, value: str | None) -> None:
    keel_id = exp_in(store, text_arg(args, "experiment_id"))
    row = get_row(store, keel_id)
    tags = json.loads(row.tags) if row.tags else {}
    if value is None:
        if key not in tags:
            raise not_found(f"No tag with name: {key} in experiment {keel_id}")
        del tags[key]
    else:
        _check_tags({key: value})
        tags[key] = value
    with store.engine.begin() as conn:
        conn.execute(
            experiments.update()
            .where(experiments.c.id == keel_id)
            .values(tags=json.dumps(tags) if tags else None, updated_at=time.time())
        )


@router.post("/experiments/set-experiment-tag")
def set_tag(args: Args, store: Store, _: Operator) -> Response:
    _change_tags(store, args, text_arg(args, "key"), text_arg(args, "value", required=False))
    return reply({})


@router.post("/experiments/delete-experiment-tag")
def delete_tag(args: Args, store: Store, _: Operator) -> Response:
    _change_tags(store, args, text_arg(args, "key"), None)
    return reply({})
