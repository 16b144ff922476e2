"""How keel's records look to MLflow: ids, statuses, runs as MLflow JSON.

- An experiment's MLflow id is keel's integer id as text; keel's "Default"
  experiment is MLflow's experiment "0".
- A run's MLflow id is its keel id. A step of a workflow run (a nested run in
  keel) is the MLflow run `<run_id>-<seq>`, whose parent is its workflow run.
- The tags mlflow.runName, mlflow.user and mlflow.parentRunId are not stored:
  they are the run's name, user and parent (keel's parent_id, parent_seq).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.server.mlflow.common import ms, not_found, number, pairs, stored_id
from keel.store.metadata import MetadataStore
from keel.store.schema import experiments, latest_metrics, params, runs, steps, tags
from keel.store.tracking import DEFAULT_EXPERIMENT, experiment_id

DEFAULT_ID = "0"
NAME_TAG = "mlflow.runName"
USER_TAG = "mlflow.user"
PARENT_TAG = "mlflow.parentRunId"
SYNTHETIC_TAGS = frozenset({NAME_TAG, USER_TAG, PARENT_TAG})

TO_KEEL_STATUS = {
    "RUNNING": "RUNNING",
    "SCHEDULED": "PENDING",
    "FINISHED": "SUCCEEDED",
    "FAILED": "FAILED",
    "KILLED": "CANCELLED",
}
TO_MLFLOW_STATUS = {
    "PENDING": "SCHEDULED",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "FINISHED",
    "CACHED": "FINISHED",
    "FAILED": "FAILED",
    "CANCELLED": "KILLED",
    "SKIPPED": "KILLED",
}
_CHUNK = 500


# -- experiments ----------------------------------------------------------------------------


def default_experiment(store: MetadataStore) -> int | None:
    with store.engine.connect() as conn:
        found = conn.execute(
            sa.select(experiments.c.id).where(experiments.c.name == DEFAULT_EXPERIMENT)
        ).scalar()
    return None if found is None else int(found)


def exp_out(store: MetadataStore, keel_id: int | None, default: int | None = None) -> str:
    if keel_id is None:
        return DEFAULT_ID
    if default is None:
        default = default_experiment(store)
    return DEFAULT_ID if keel_id == default else str(keel_id)


def exp_in(store: MetadataStore, mlflow_id: Any) -> int:
    """keel's id of an MLflow experiment id (experiment "0" is created on first use)."""
    text = str(mlflow_id).strip()
    if text == DEFAULT_ID:
        return experiment_id(store, DEFAULT_EXPERIMENT)
    number = stored_id(text)
    if number is None:
        raise not_found(f"no experiment with id {text!r}")
    return number


def artifact_root(exp: str) -> str:
    return f"mlflow-artifacts:/{exp}"


# -- runs and steps as MLflow runs ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tracked:
    """A keel run (seq -1) or step (seq >= 0) seen as an MLflow run."""

    mlflow_id: str
    run_id: str
    seq: int
    experiment_id: int | None
    name: str
    status: str  # keel's
    kind: str
    start: float | None
    end: float | None
    user: str | None
    lifecycle: str
    parent: str | None  # MLflow id of the parent


def step_id(run_id: str, seq: int) -> str:
    return f"{run_id}-{seq}"


def parent_of(row: Any) -> str | None:
    if row.parent_id is None:
        return None
    return row.parent_id if row.parent_seq is None else step_id(row.parent_id, row.parent_seq)


def from_run(row: Any) -> Tracked:
    return Tracked(
        mlflow_id=row.id,
        run_id=row.id,
        seq=-1,
        experiment_id=row.experiment_id,
        name=row.run_name or row.workflow,
        status=row.status,
        kind=row.kind,
        start=row.started_at if row.started_at is not None else row.created_at,
        end=row.ended_at,
        user=row.user,
        lifecycle=row.lifecycle_stage,
        parent=parent_of(row),
    )


def find(store: MetadataStore, mlflow_id: str) -> Tracked:
    """The run or step an MLflow run id names; RESOURCE_DOES_NOT_EXIST if none."""
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.id == mlflow_id)).first()
        if row is not None:
            return from_run(row)
        head, _, tail = mlflow_id.rpartition("-")
        seq = stored_id(tail)
        if head and seq is not None:
            parent = conn.execute(sa.select(runs).where(runs.c.id == head)).first()
            step = conn.execute(
                sa.select(steps).where(steps.c.run_id == head, steps.c.seq == seq)
            ).first()
            if parent is not None and step is not None:
                return Tracked(
                    mlflow_id=mlflow_id,
                    run_id=head,
                    seq=seq,
                    experiment_id=parent.experiment_id,
                    name=step.key,
                    status=step.status,
                    kind="step",
                    start=step.started_at,
                    end=step.ended_at,
                    user=parent.user,
                    lifecycle=parent.lifecycle_stage,
                    parent=head,
                )
    raise not_found(f"Run with id={mlflow_id} not found")


def artifact_uri(exp: str, mlflow_id: str) -> str:
    return f"mlflow-artifacts:/{exp}/{mlflow_id}/artifacts"


def run_info(t: Tracked, exp: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "run_id": t.mlflow_id,
        "run_uuid": t.mlflow_id,
        "run_name": t.name,
        "experiment_id": exp,
        "user_id": t.user or "",
        "status": TO_MLFLOW_STATUS.get(t.status, "RUNNING"),
        "artifact_uri": artifact_uri(exp, t.mlflow_id),
        "lifecycle_stage": t.lifecycle,
    }
    if t.start is not None:
        info["start_time"] = ms(t.start)
    if t.end is not None:
        info["end_time"] = ms(t.end)
    return info


@dataclass(slots=True)
class Data:
    params: dict[str, str]
    metrics: list[dict[str, Any]]
    tags: dict[str, str]


def load_data(store: MetadataStore, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Data]:
    """Params, latest metrics and tags of each (run_id, seq)."""
    wanted = set(keys)
    out = {key: Data({}, [], {}) for key in wanted}
    run_ids = sorted({run_id for run_id, _ in wanted})
    with store.engine.connect() as conn:
        for start in range(0, len(run_ids), _CHUNK):
            chunk = run_ids[start : start + _CHUNK]
            for table in (params, tags):
                stmt = sa.select(table.c.run_id, table.c.seq, table.c.key, table.c.value).where(
                    table.c.run_id.in_(chunk)
                )
                for r in conn.execute(stmt):
                    held = out.get((r.run_id, r.seq))
                    if held is not None:
                        (held.params if table is params else held.tags)[r.key] = r.value
            stmt = sa.select(latest_metrics).where(latest_metrics.c.run_id.in_(chunk))
            for r in conn.execute(stmt):
                held = out.get((r.run_id, r.seq))
                if held is not None:
                    value = math.nan if r.is_nan or r.value is None else float(r.value)
                    held.metrics.append(
                        {
                            "key": r.key,
                            "value": number(value),
                            "timestamp": ms(r.timestamp),
                            "step": r.step,
                        }
                    )
    return out


def run_json(
    t: Tracked,
    exp: str,
    data: Data,
    outputs: list[str] | None = None,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    shown = {k: v for k, v in data.tags.items() if k not in SYNTHETIC_TAGS}
    shown[NAME_TAG] = t.name
    if t.user:
        shown[USER_TAG] = t.user
    if t.parent:
        shown[PARENT_TAG] = t.parent
    run: dict[str, Any] = {
        "info": run_info(t, exp),
        "data": {
            "metrics": sorted(data.metrics, key=lambda m: m["key"]),
            "params": pairs(dict(sorted(data.params.items()))),
            "tags": pairs(shown),
        },
        "inputs": inputs or {},
        "outputs": {},
    }
    if outputs:
        run["outputs"] = {"model_outputs": [{"model_id": m, "step": 0} for m in outputs]}
    return run
