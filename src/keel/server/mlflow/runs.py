"""Runs: create, update, get, delete, restore, search, and the models a run logged.

A run created through MLflow is a keel tracking run (kind "tracking", as with
keel.start_run); `mlflow.parentRunId` makes it a nested run (keel's parent_id).
Statuses map FINISHED/FAILED/KILLED/SCHEDULED <-> SUCCEEDED/FAILED/CANCELLED/PENDING.
Workflow runs and their steps are run by keel's engine: their status cannot be set
through MLflow.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.ids import new_run_id
from keel.server.mlflow import search
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
    reply,
    seconds,
    text_arg,
)
from keel.server.mlflow.data import check_tags, record, writable
from keel.server.mlflow.experiments import get_row, view_type
from keel.server.mlflow.inputs import load_inputs
from keel.server.mlflow.mapping import (
    NAME_TAG,
    PARENT_TAG,
    TO_KEEL_STATUS,
    USER_TAG,
    Tracked,
    default_experiment,
    exp_in,
    exp_out,
    find,
    load_data,
    run_info,
    run_json,
)
from keel.store.metadata import MetadataStore
from keel.store.schema import logged_models
from keel.tracking.filters import parse_filter, parse_order_by

router = APIRouter(route_class=MlflowRoute)


def outputs_of(store: MetadataStore, mlflow_ids: list[str]) -> dict[str, list[str]]:
    """The logged models each run produced."""
    if not mlflow_ids:
        return {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(logged_models.c.model_id, logged_models.c.source_run_id)
            .where(logged_models.c.source_run_id.in_(mlflow_ids))
            .order_by(logged_models.c.created_at)
        )
        out: dict[str, list[str]] = {}
        for r in rows:
            out.setdefault(r.source_run_id, []).append(r.model_id)
    return out


def full_run(store: MetadataStore, t: Tracked) -> dict[str, Any]:
    data = load_data(store, [(t.run_id, t.seq)])[(t.run_id, t.seq)]
    outputs = outputs_of(store, [t.mlflow_id]).get(t.mlflow_id)
    inputs = load_inputs(store, [(t.run_id, t.seq)]).get((t.run_id, t.seq))
    return run_json(t, exp_out(store, t.experiment_id), data, outputs, inputs)


@router.post("/runs/create")
def create(args: Args, store: Store, _: Operator) -> Response:
    keel_exp = exp_in(store, args.get("experiment_id") or "0")
    experiment = get_row(store, keel_exp)
    if experiment.lifecycle_stage != "active":
        raise invalid(f"The experiment {keel_exp} must be in the 'active' state")
    tags = key_values(args, "tags")
    check_tags(tags)
    run_id = new_run_id()
    name = (text_arg(args, "run_name", required=False) or tags.get(NAME_TAG, "")).strip()
    name = name[:250] or f"run-{run_id[-6:]}"
    user = text_arg(args, "user_id", required=False) or tags.get(USER_TAG, "")
    parent = find(store, tags[PARENT_TAG]) if tags.get(PARENT_TAG) else None
    now = time.time()
    start = seconds(args.get("start_time"), "start_time") or now
    store.insert_run(
        {
            "id": run_id,
            "workflow": name,
            "status": "RUNNING",
            "kind": "tracking",
            "run_name": name,
            "experiment_id": keel_exp,
            "parent_id": parent.run_id if parent is not None else None,
            "parent_seq": parent.seq if parent is not None and parent.seq >= 0 else None,
            "created_at": now,
            "started_at": start,
            "cancel_requested": False,
            "user": user[:100] or None,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lifecycle_stage": "active",
        }
    )
    t = find(store, run_id)
    plain = {k: v for k, v in tags.items() if k not in (NAME_TAG, USER_TAG, PARENT_TAG)}
    record(store, t, given_tags=plain)
    return reply({"run": full_run(store, t)})


@router.post("/runs/update")
def update(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    values: dict[str, Any] = {}
    status = text_arg(args, "status", required=False).upper()
    if status:
        if status not in TO_KEEL_STATUS:
            raise invalid(f"status must be one of {', '.join(TO_KEEL_STATUS)}, got {status!r}")
        if TO_KEEL_STATUS[status] != t.status:
            if t.kind in ("workflow", "step"):
                raise invalid(
                    f"run {t.mlflow_id} is a keel {t.kind}: keel's engine sets its status "
                    "(cancel or resume it with `keel runs`)"
                )
            values["status"] = TO_KEEL_STATUS[status]
    end = seconds(args.get("end_time"), "end_time")
    if end is not None and t.kind != "step":
        values["ended_at"] = end
    name = text_arg(args, "run_name", required=False).strip()
    if name and t.seq < 0:
        values["run_name"] = name[:250]
    if values:
        store.update_run(t.run_id, **values)
        t = find(store, t.mlflow_id)
    return reply({"run_info": run_info(t, exp_out(store, t.experiment_id))})


@router.get("/runs/get")
def get(args: Args, store: Store, _: Viewer) -> Response:
    t = find(store, text_arg(args, "run_id", "run_uuid"))
    return reply({"run": full_run(store, t)})


def _set_stage(store: MetadataStore, mlflow_id: str, stage: str) -> Response:
    t = find(store, mlflow_id)
    if t.seq >= 0:
        raise invalid(f"{mlflow_id} is a step of run {t.run_id}: delete or restore the run")
    store.update_run(t.run_id, lifecycle_stage=stage)
    return reply({})


@router.post("/runs/delete")
def delete(args: Args, store: Store, _: Operator) -> Response:
    return _set_stage(store, text_arg(args, "run_id", "run_uuid"), "deleted")


@router.post("/runs/restore")
def restore(args: Args, store: Store, _: Operator) -> Response:
    return _set_stage(store, text_arg(args, "run_id", "run_uuid"), "active")


@router.api_route("/runs/search", methods=["GET", "POST"])
def search_runs(args: Args, store: Store, _: Viewer) -> Response:
    wanted = [str(e) for e in list_arg(args, "experiment_ids")]
    exp_ids = [exp_in(store, e) for e in wanted] if wanted else None
    view = view_type(args.get("run_view_type"))
    expr = parse_filter(str(args.get("filter") or ""))
    order = [parse_order_by(search.order_key(str(o))) for o in list_arg(args, "order_by")]
    limit = int_arg(args, "max_results", 1000, 50_000)
    offset = decode_token(args.get("page_token"))
    found = search.find(
        store,
        experiment_ids=exp_ids,
        view=view,
        expr=expr,
        order=order,
        offset=offset,
        limit=limit + 1,
    )
    page = found[:limit]
    data = load_data(store, [(t.run_id, t.seq) for t in page])
    outputs = outputs_of(store, [t.mlflow_id for t in page])
    inputs = load_inputs(store, [(t.run_id, t.seq) for t in page])
    default = default_experiment(store)
    body: dict[str, Any] = {
        "runs": [
            run_json(
                t,
                exp_out(store, t.experiment_id, default if default is not None else -1),
                data[(t.run_id, t.seq)],
                outputs.get(t.mlflow_id),
                inputs.get((t.run_id, t.seq)),
            )
            for t in page
        ]
    }
    if len(found) > limit:
        body["next_page_token"] = encode_token(offset + limit)
    return reply(body)


@router.post("/runs/outputs")
def log_outputs(args: Args, store: Store, _: Operator) -> Response:
    """Links logged models to the run that produced them (kept as their source run)."""
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    ids = [m.get("model_id") for m in list_arg(args, "models") if isinstance(m, dict)]
    with store.engine.begin() as conn:
        conn.execute(
            logged_models.update()
            .where(logged_models.c.model_id.in_(ids), logged_models.c.source_run_id.is_(None))
            .values(source_run_id=t.mlflow_id)
        )
    return reply({})
