"""SQL of deployments: the servers `keel serve` runs, and their heartbeats.

A server inserts its row at start, bumps `heartbeat_at` every `HEARTBEAT_SECONDS`,
updates the version it serves after each (re)load (and, with each heartbeat, its
request totals, rate and latency percentiles), and marks the row stopped when it
exits. A server killed without that last write stops heartbeating: readers show it
as `stale` once its heartbeat is older than `STALE_AFTER` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.store.metadata import MetadataStore
from keel.store.schema import deployments

HEARTBEAT_SECONDS = 2.0
STALE_AFTER = 5 * HEARTBEAT_SECONDS


@dataclass(frozen=True)
class Deployment:
    id: str
    target: str
    kind: str
    model: str | None
    version: int | None
    host: str
    port: int
    workers: int
    pid: int
    machine: str
    state: str  # starting | serving | stopped | stale (read side only)
    last_error: str | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    requests: int | None = None  # totals since start, then rate and latency over a minute
    errors: int | None = None
    rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def insert(store: MetadataStore, values: Mapping[str, Any]) -> None:
    now = time.time()
    row = {"state": "starting", "started_at": now, "heartbeat_at": now, **values}
    with store.engine.begin() as conn:
        conn.execute(deployments.insert().values(**row))


def update(store: MetadataStore, deployment_id: str, **values: Any) -> None:
    """Change the row's fields (and count it as a heartbeat)."""
    values.setdefault("heartbeat_at", time.time())
    with store.engine.begin() as conn:
        conn.execute(
            deployments.update()
            .where(deployments.c.id == deployment_id, deployments.c.state != "stopped")
            .values(**values)
        )


def heartbeat(store: MetadataStore, deployment_id: str, **traffic: Any) -> None:
    """A heartbeat, with the server's traffic (`requests`, `errors`, `rate`, `p50_ms`,
    `p95_ms`) when it keeps any."""
    update(store, deployment_id, **traffic)


def mark_stopped(store: MetadataStore, deployment_id: str) -> None:
    now = time.time()
    update(store, deployment_id, state="stopped", stopped_at=now, heartbeat_at=now)


def _of(row: Any, now: float) -> Deployment:
    state = row.state
    if state != "stopped" and now - row.heartbeat_at > STALE_AFTER:
        state = "stale"
    fields = {c.name: getattr(row, c.name) for c in deployments.columns}
    return Deployment(**{**fields, "state": state})


def get(store: MetadataStore, deployment_id: str) -> Deployment | None:
    with store.engine.connect() as conn:
        row = conn.execute(deployments.select().where(deployments.c.id == deployment_id)).first()
    return None if row is None else _of(row, time.time())


def list_deployments(
    store: MetadataStore,
    *,
    model: str | None = None,
    version: int | None = None,
    include_stopped: bool = False,
    limit: int = 200,
) -> list[Deployment]:
    """Newest first; stopped ones only when asked for."""
    stmt = deployments.select().order_by(deployments.c.started_at.desc()).limit(limit)
    if model is not None:
        stmt = stmt.where(deployments.c.model == model)
    if version is not None:
        stmt = stmt.where(deployments.c.version == version)
    if not include_stopped:
        stmt = stmt.where(deployments.c.state != "stopped")
    now = time.time()
    with store.engine.connect() as conn:
        return [_of(row, now) for row in conn.execute(stmt)]
