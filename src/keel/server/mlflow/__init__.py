"""The MLflow tracking REST API on keel's store, so the `mlflow` client can use a keel
server (MLFLOW_TRACKING_URI=http://host:port). See docs/mlflow.md for what is covered.

One module per resource: experiments, runs (and search), data (params, metrics,
tags), inputs (datasets a run read), artifacts (the mlflow-artifacts proxy),
logged_models, registry; mapping says how keel's records look to MLflow. None of
these routes is in keel's OpenAPI document.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from keel.server.mlflow import (
    artifacts,
    data,
    experiments,
    inputs,
    logged_models,
    registry,
    runs,
)
from keel.server.mlflow.common import MlflowError, MlflowRoute

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

_unknown = APIRouter(route_class=MlflowRoute)


@_unknown.api_route("/{rest:path}", methods=_METHODS)
def _not_covered(rest: str, request: Request) -> Response:
    raise MlflowError(
        "ENDPOINT_NOT_FOUND",
        f"{request.method} {request.url.path} is not part of keel's MLflow API (docs/mlflow.md)",
    )


def _combined(*routers: APIRouter) -> APIRouter:
    out = APIRouter(route_class=MlflowRoute)
    for router in routers:
        out.include_router(router)
    out.include_router(_unknown)  # last: what no route above answers
    return out


def install(app: FastAPI) -> None:
    """Mount the MLflow routes on `app`, each prefix as one mount: a request elsewhere
    (the UI, /api/v1) is not matched against every MLflow route first."""
    api = _combined(
        experiments.router,
        runs.router,
        data.router,
        inputs.router,
        logged_models.router,
        registry.router,
    )
    files = _combined(artifacts.router)
    for base in ("/api/2.0", "/ajax-api/2.0"):
        app.mount(f"{base}/mlflow", api)
        app.mount(f"{base}/mlflow-artifacts", files)
    app.mount("/api/3.0/mlflow", _combined(artifacts.info_router))
