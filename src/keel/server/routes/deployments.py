"""Deployments: the servers `keel serve` runs, read from the store.

A deployment whose heartbeats stopped (killed without shutting down) is `stale`;
stopped ones are listed only with `?all=true`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from keel.server.routes.common import AUTH, ERRORS, Store, Viewer

router = APIRouter(tags=["deployments"], responses=ERRORS)


class DeploymentOut(BaseModel):
    id: str
    target: str
    kind: str
    model: str | None
    version: int | None
    url: str
    host: str
    port: int
    workers: int
    pid: int
    machine: str
    state: str
    last_error: str | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    requests: int | None = Field(None, description="Requests answered since the start")
    errors: int | None = Field(None, description="Of them, answered with an error")
    rate: float | None = Field(None, description="Requests per second, over the last minute")
    p50_ms: float | None = Field(None, description="Median latency over the last minute")
    p95_ms: float | None = Field(None, description="95th percentile latency, last minute")


@router.get("/deployments", response_model=list[DeploymentOut], dependencies=AUTH)
def list_deployments(
    _: Viewer,
    store: Store,
    model: Annotated[str | None, Query(max_length=250, description="A model's name")] = None,
    version: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="One version of it")
    ] = None,
    all: Annotated[bool, Query(description="Also stopped deployments")] = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[DeploymentOut]:
    """Running (and stale) servers, newest first: what they serve, where, since when."""
    from keel.store import deployments

    found = deployments.list_deployments(
        store, model=model, version=version, include_stopped=all, limit=limit
    )
    return [DeploymentOut(**d.to_dict(), url=f"http://{d.host}:{d.port}/") for d in found]
