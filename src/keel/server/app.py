"""The FastAPI application: routes, error replies, the audit log of mutating calls."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from keel import __version__
from keel.server import errors
from keel.server import mlflow as mlflow_api
from keel.server.routes import (
    artifacts,
    deployments,
    events,
    experiments,
    health,
    inferences,
    logs,
    metrics,
    models,
    runs,
    steps,
    tokens,
    triggers,
    workflows,
)
from keel.server.routes import audit as audit_log_routes
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import audit_log

_MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def create_app(store: MetadataStore | None = None) -> FastAPI:
    app = FastAPI(
        title="keel",
        version=__version__,
        description="Runs, steps, logs, artifacts, experiments and models recorded by keel.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.store = store or open_store()
    errors.install(app)
    api = (health, runs, steps, logs, artifacts, experiments, metrics, models, workflows)
    for module in (*api, inferences, events, triggers, tokens, audit_log_routes, deployments):
        app.include_router(module.router, prefix="/api/v1")
    mlflow_api.install(app)

    @app.middleware("http")
    async def audit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.method in _MUTATING:
            principal = getattr(request.state, "principal", None)
            _record(app.state.store, request, response.status_code, principal)
        return response

    from keel.server import ui

    ui.mount(app)  # the web UI: its pages' shell and /static (after the API routes)
    return app


def _record(store: MetadataStore, request: Request, status: int, principal: object) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            audit_log.insert().values(
                at=time.time(),
                actor=getattr(principal, "name", None),
                role=getattr(principal, "role", None),
                method=request.method,
                path=request.url.path,
                status=status,
                detail=json.dumps({"query": str(request.url.query)}) if request.url.query else None,
            )
        )
