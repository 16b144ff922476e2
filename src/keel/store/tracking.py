"""Reads of tracking data: experiments, params, metrics, tags, logged artifacts.

Writes go through the recorder (store/recorder.py) so they are batched with the
engine's own records.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.errors import TrackingError
from keel.store.metadata import MetadataStore
from keel.store.schema import experiments, latest_metrics, logged_artifacts, metrics, params, tags

DEFAULT_EXPERIMENT = "Default"
# Limits on what tracking calls accept (the same as MLflow's, so its clients fit).
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_PATH_LENGTH = 1000  # a logged artifact's path (keel_logged_artifacts.path)
MAX_NAME_LENGTH = 250  # experiment, run and model names, aliases


@dataclass(frozen=True, slots=True)
class Experiment:
    id: int
    name: str
    lifecycle_stage: str
    tags: dict[str, str]
    created_at: float


def _experiment(row: Any) -> Experiment:
    return Experiment(
        id=row.id,
        name=row.name,
        lifecycle_stage=row.lifecycle_stage,
        tags=json.loads(row.tags) if row.tags else {},
        created_at=row.created_at,
    )


_ids: dict[tuple[int, str], int] = {}
_ids_lock = threading.Lock()


def experiment_id(store: MetadataStore, name: str, *, create: bool = True) -> int:
    """The id of the experiment called `name`, created on first use."""
    cached = _ids.get((id(store), name))
    if cached is not None:
        return cached
    with _ids_lock:
        found = get_experiment(store, name)
        if found is None:
            if not create:
                raise TrackingError(f"no experiment named {name!r}")
            now = time.time()
            try:
                with store.engine.begin() as conn:
                    conn.execute(
                        experiments.insert().values(
                            name=name, lifecycle_stage="active", created_at=now, updated_at=now
                        )
                    )
            except sa.exc.IntegrityError:
                pass  # another process created it first
            found = get_experiment(store, name)
            assert found is not None
        _ids[(id(store), name)] = found.id
        return found.id


def get_experiment(store: MetadataStore, name_or_id: str | int) -> Experiment | None:
    column = experiments.c.id if isinstance(name_or_id, int) else experiments.c.name
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(experiments).where(column == name_or_id)).first()
    return _experiment(row) if row is not None else None


def list_experiments(store: MetadataStore, *, include_deleted: bool = False) -> list[Experiment]:
    stmt = sa.select(experiments).order_by(experiments.c.id)
    if not include_deleted:
        stmt = stmt.where(experiments.c.lifecycle_stage == "active")
    with store.engine.connect() as conn:
        return [_experiment(r) for r in conn.execute(stmt)]


def load_params(store: MetadataStore, run_id: str, seq: int) -> dict[str, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(params.c.key, params.c.value).where(
                params.c.run_id == run_id, params.c.seq == seq
            )
        )
        return {r.key: r.value for r in rows}


def load_tags(store: MetadataStore, run_id: str, seq: int) -> dict[str, str]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(tags.c.key, tags.c.value).where(tags.c.run_id == run_id, tags.c.seq == seq)
        )
        return {r.key: r.value for r in rows}


def _value(value: float | None, is_nan: bool) -> float:
    return float("nan") if is_nan or value is None else float(value)


def load_latest_metrics(store: MetadataStore, run_id: str, seq: int) -> dict[str, float]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(latest_metrics).where(
                latest_metrics.c.run_id == run_id, latest_metrics.c.seq == seq
            )
        )
        return {r.key: _value(r.value, r.is_nan) for r in rows}


@dataclass(frozen=True, slots=True)
class MetricPoint:
    key: str
    value: float
    step: int
    timestamp: float


def load_metric_history(store: MetadataStore, run_id: str, seq: int, key: str) -> list[MetricPoint]:
    stmt = (
        sa.select(metrics)
        .where(metrics.c.run_id == run_id, metrics.c.seq == seq, metrics.c.key == key)
        .order_by(metrics.c.step, metrics.c.timestamp, metrics.c.id)
    )
    with store.engine.connect() as conn:
        return [
            MetricPoint(r.key, _value(r.value, r.is_nan), r.step, r.timestamp)
            for r in conn.execute(stmt)
        ]


@dataclass(frozen=True, slots=True)
class LoggedArtifact:
    path: str
    hash: str
    size: int
    kind: str
    created_at: float


def load_logged_artifacts(store: MetadataStore, run_id: str, seq: int) -> list[LoggedArtifact]:
    stmt = (
        sa.select(logged_artifacts)
        .where(logged_artifacts.c.run_id == run_id, logged_artifacts.c.seq == seq)
        .order_by(logged_artifacts.c.path)
    )
    with store.engine.connect() as conn:
        return [
            LoggedArtifact(r.path, r.hash, r.size, r.kind, r.created_at) for r in conn.execute(stmt)
        ]
