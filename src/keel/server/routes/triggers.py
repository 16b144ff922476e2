"""Triggers: list them and their firings, and the webhook that fires one.

`POST /api/v1/triggers/{name}` is called by other systems with the webhook's own
token (shown by `keel triggers add --webhook`), not an API token: send it as
`X-Keel-Trigger-Token` (or `?token=` where only a URL can be configured). The JSON
body's keys are the run's parameters.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request
from pydantic import BaseModel

from keel.errors import ParameterError, ScheduleError
from keel.server import audit
from keel.server.auth import Principal
from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Store, Viewer
from keel.store.metadata import MetadataStore

router = APIRouter(tags=["triggers"], responses=ERRORS)

Name = Annotated[str, Path(max_length=200, description="The trigger's name")]


class TriggerOut(BaseModel):
    name: str
    kind: str
    description: str
    workflow: str
    params: dict[str, Any]
    enabled: bool
    created_at: float


class TriggerEventOut(BaseModel):
    id: int
    trigger: str
    fired_at: float
    cause: dict[str, Any]
    run_id: str | None


class FiredOut(BaseModel):
    trigger: str
    run_id: str
    status: str


def _out(info: Any) -> TriggerOut:
    return TriggerOut(
        name=info.name,
        kind=info.kind,
        description=info.describe(),
        workflow=info.workflow,
        params=info.params,
        enabled=info.enabled,
        created_at=info.created_at,
    )


def _get(store: MetadataStore, name: str) -> Any:
    from keel.scheduler import triggers

    try:
        return triggers.get(name, store=store)
    except ScheduleError as exc:
        raise ApiError(404, "not_found", exc.message, {"hint": exc.hint}) from None


@router.get("/triggers", response_model=list[TriggerOut], dependencies=AUTH)
def list_triggers(_: Viewer, store: Store) -> list[TriggerOut]:
    """Every trigger (webhook tokens are never shown)."""
    from keel.scheduler import triggers

    return [_out(t) for t in triggers.ls(store=store)]


@router.get("/triggers/{name}/events", response_model=list[TriggerEventOut], dependencies=AUTH)
def trigger_events(
    name: Name, _: Viewer, store: Store, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> list[TriggerEventOut]:
    """The trigger's recorded firings, newest first."""
    from keel.scheduler import triggers

    _get(store, name)
    return [
        TriggerEventOut(
            id=e.id, trigger=e.trigger, fired_at=e.fired_at, cause=e.cause, run_id=e.run_id
        )
        for e in triggers.events(name, limit=limit, store=store)
    ]


@router.post("/triggers/{name}", response_model=FiredOut, status_code=202)
def fire(
    name: Name,
    request: Request,
    store: Store,
    payload: Annotated[dict[str, Any] | None, Body()] = None,
    x_keel_trigger_token: Annotated[str | None, Header(max_length=500)] = None,
    token: Annotated[str | None, Query(max_length=500)] = None,
) -> FiredOut:
    """Fire a webhook trigger: queue a run of its workflow with the trigger's params
    and the payload's keys as parameters (checked against the workflow: 422)."""
    from keel.scheduler import triggers

    given = x_keel_trigger_token or token
    request.state.principal = caller = Principal(f"webhook:{name}"[:200], "webhook")
    audit.arm(caller.name, caller.role, 202)
    info = _get(store, name)
    if info.kind != "webhook":
        raise ApiError(409, "conflict", f"trigger {name!r} is a {info.kind} trigger, not a webhook")
    if not given:
        raise ApiError(
            401,
            "unauthenticated",
            f"firing trigger {name!r} needs its webhook token",
            {"hint": "Send it as the X-Keel-Trigger-Token header"},
        )
    try:
        handle = triggers.fire_trigger(name, payload or {}, token=given, store=store)
    except ParameterError as exc:
        raise ApiError(422, "invalid_parameters", exc.message, {"hint": exc.hint}) from None
    except ScheduleError as exc:
        if "wrong token" in exc.message:
            raise ApiError(403, "forbidden", exc.message) from None
        raise ApiError(409, "conflict", exc.message, {"hint": exc.hint}) from None
    return FiredOut(trigger=name, run_id=handle.id, status=handle.status)
