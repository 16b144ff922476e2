"""The FastAPI application: routes, error replies, and in front of them the guard
(guard.py) and the audit log of mutating calls (audit.py)."""

from __future__ import annotations

from fastapi import FastAPI

from keel import __version__
from keel.server import auth, errors
from keel.server import mlflow as mlflow_api
from keel.server.audit import AuditMiddleware
from keel.server.guard import GateConfig, Guard
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


def create_app(store: MetadataStore | None = None, gate: GateConfig | None = None) -> FastAPI:
    """The app on `store`; `gate` says who may come in (by default: a server on
    127.0.0.1, with the limits of the KEEL_SERVER_* variables)."""
    app = FastAPI(
        title="keel",
        version=__version__,
        description="Runs, steps, logs, artifacts, experiments and models recorded by keel.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    app.state.store = store = store or open_store()
    app.state.gate = gate = gate or GateConfig.from_env()
    # Decided once: anonymous callers are the local admin only on loopback (or with
    # --insecure-no-auth), and only until a token is first created.
    app.state.auth_mode = mode = auth.AuthMode(store, gate.loopback or gate.insecure_no_auth)
    errors.install(app)
    api = (health, runs, steps, logs, artifacts, experiments, metrics, models, workflows)
    for module in (*api, inferences, events, triggers, tokens, audit_log_routes, deployments):
        app.include_router(module.router, prefix="/api/v1")
    mlflow_api.install(app)

    from keel.server import ui

    ui.mount(app)  # the web UI: its pages' shell and /static (after the API routes)
    # The last added runs first: the guard, then the audit record, then the routes.
    app.add_middleware(AuditMiddleware, store=store)
    app.add_middleware(Guard, store=store, config=gate, mode=mode)
    return app
