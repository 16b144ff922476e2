"""runs/log-inputs: the datasets a run read and the logged models it used
(`mlflow.log_input`, autolog), kept in keel_run_inputs and shown in the run's `inputs`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.server.mlflow.common import (
    Args,
    MlflowRoute,
    Operator,
    Store,
    invalid,
    list_arg,
    reply,
    text_arg,
)
from keel.server.mlflow.data import writable
from keel.store.metadata import MetadataStore
from keel.store.schema import run_inputs

router = APIRouter(route_class=MlflowRoute)
_DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")


def _dataset(item: Any) -> tuple[str, dict[str, Any]]:
    dataset = item.get("dataset") if isinstance(item, dict) else None
    if not isinstance(dataset, dict) or not dataset.get("name") or not dataset.get("digest"):
        raise invalid("each dataset input needs a dataset with a name and a digest")
    kept = {k: str(dataset[k]) for k in _DATASET_FIELDS if dataset.get(k) is not None}
    tags = [
        {"key": str(t["key"]), "value": str(t.get("value", ""))}
        for t in item.get("tags") or []
        if isinstance(t, dict) and "key" in t
    ]
    key = f"{kept['name']}:{kept['digest']}"
    if len(key) > 600:
        raise invalid("a dataset's name and digest may have at most 600 characters together")
    return key, {"tags": tags, "dataset": kept}


@router.post("/runs/log-inputs")
def log_inputs(args: Args, store: Store, _: Operator) -> Response:
    t = writable(store, text_arg(args, "run_id", "run_uuid"))
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for item in list_arg(args, "datasets"):
        key, detail = _dataset(item)
        rows[("dataset", key)] = detail
    for item in list_arg(args, "models"):
        model_id = item.get("model_id") if isinstance(item, dict) else None
        if not isinstance(model_id, str) or not model_id or len(model_id) > 600:
            raise invalid("each model input needs a model_id")
        rows[("model", model_id)] = {"model_id": model_id}
    now = time.time()
    table = run_inputs
    with store.engine.begin() as conn:
        for (kind, key), detail in rows.items():
            conn.execute(
                table.delete().where(
                    table.c.run_id == t.run_id,
                    table.c.seq == t.seq,
                    table.c.kind == kind,
                    table.c.key == key,
                )
            )
            conn.execute(
                table.insert().values(
                    run_id=t.run_id,
                    seq=t.seq,
                    kind=kind,
                    key=key,
                    detail=json.dumps(detail),
                    created_at=now,
                )
            )
    return reply({})


def load_inputs(
    store: MetadataStore, keys: Iterable[tuple[str, int]]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Each (run_id, seq)'s `inputs` as MLflow shows them (only those that have any)."""
    wanted = set(keys)
    run_ids = sorted({run_id for run_id, _ in wanted})
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if not run_ids:
        return out
    stmt = (
        sa.select(run_inputs)
        .where(run_inputs.c.run_id.in_(run_ids))
        .order_by(run_inputs.c.created_at, run_inputs.c.key)
    )
    with store.engine.connect() as conn:
        for r in conn.execute(stmt):
            if (r.run_id, r.seq) not in wanted:
                continue
            held = out.setdefault((r.run_id, r.seq), {})
            name = "dataset_inputs" if r.kind == "dataset" else "model_inputs"
            held.setdefault(name, []).append(json.loads(r.detail))
    return out
