"""The MLflow tracking REST API on keel's store, so the `mlflow` client can use a keel
server (MLFLOW_TRACKING_URI=http://host:port). See docs/mlflow.md for what is covered.

One module per resource: experiments, runs (and search), data (params, metrics,
tags), artifacts (the mlflow-artifacts proxy), logged_models, registry; mapping says
how keel's records look to MLflow. None of these routes is in keel's OpenAPI document.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response

from keel.server.mlflow import artifacts, data, experiments, logged_models, registry, runs
from keel.server.mlflow.common import MlflowError, MlflowRoute

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]

_unknown = APIRouter(route_class=MlflowRoute)


@_unknown.api_route("/{rest:path}", methods=_METHODS)
def _not_covered(rest: str, request: Request) -> Response:
    raise MlflowError(
        "ENDPOINT_NOT_FOUND",
        f"{request.method} {request.url.path} is not part of keel's MLflow API (docs/mlflow.md)",
    )


def install(app: FastAPI) -> None:
    """Mount the MLflow routes on `app`."""
    for base in ("/api/2.0", "/ajax-api/2.0"):
        for module in (experiments, runs, data, logged_models, registry):
            app.include_router(module.router, prefix=f"{base}/mlflow", include_in_schema=False)
        app.include_router(
            artifacts.router, prefix=f"{base}/mlflow-artifacts", include_in_schema=False
        )
        for prefix in ("mlflow", "mlflow-artifacts"):
            app.include_router(_unknown, prefix=f"{base}/{prefix}", include_in_schema=False)
    app.include_router(artifacts.info_router, prefix="/api/3.0/mlflow", include_in_schema=False)
