"""Workflows the server can start (registered with `keel server --workflows` or in
keel.toml), with their parameters as JSON Schema, and starting a run of one."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from keel.errors import ParameterError
from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Operator, Store, Viewer
from keel.server.routes.runs import RunOut, run_out
from keel.server.workflows import (
    WorkflowEntry,
    check_params,
    dispatch_of,
    params_schema,
    registry_of,
    runner_of,
)

router = APIRouter(tags=["workflows"], dependencies=AUTH, responses=ERRORS)

Name = Annotated[str, Path(max_length=200, description="The workflow's name")]


class WorkflowOut(BaseModel):
    name: str
    description: str | None
    source: str
    entrypoint: str
    queue: str
    experiment: str
    params_schema: dict[str, Any]


class LaunchIn(BaseModel):
    params: dict[str, Any] = Field(default_factory=dict)
    dispatch: Literal["server", "queue"] | None = Field(
        None,
        description="'server': a thread of this server runs it; 'queue': it waits for "
        "`keel worker` processes. Default: the server's --dispatch (server).",
    )
    queue: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[\w.:-]+$")
    priority: int | None = Field(None, ge=-1_000_000, le=1_000_000)


class LaunchOut(BaseModel):
    run: RunOut
    dispatch: Literal["server", "queue"]


def _out(entry: WorkflowEntry) -> WorkflowOut:
    import inspect

    wf = entry.workflow
    doc = inspect.getdoc(wf.fn)
    return WorkflowOut(
        name=wf.name,
        description=doc.strip() if doc else None,
        source=entry.source,
        entrypoint=wf.entrypoint,
        queue=wf.queue,
        experiment=wf.experiment or wf.name,
        params_schema=params_schema(wf),
    )


def _entry(request: Request, name: str) -> WorkflowEntry:
    registry = registry_of(request.app.state)
    entry = registry.get(name)
    if entry is None:
        known = [e.name for e in registry]
        raise ApiError(
            404,
            "not_found",
            f"no workflow named {name!r} is registered with this server",
            {
                "hint": "Registered: " + ", ".join(known[:20])
                if known
                else "Start the server with --workflows path/to/flows.py or list them "
                "in keel.toml ([server] workflows = [...])"
            },
        )
    return entry


@router.get("/workflows", response_model=list[WorkflowOut])
def list_workflows(request: Request, _: Viewer) -> list[WorkflowOut]:
    """The workflows this server can start, with their parameters as JSON Schema."""
    return [_out(e) for e in registry_of(request.app.state)]


@router.get("/workflows/{name}", response_model=WorkflowOut)
def get_workflow(name: Name, request: Request, _: Viewer) -> WorkflowOut:
    return _out(_entry(request, name))


@router.post("/workflows/{name}/runs", response_model=LaunchOut, status_code=202)
def launch(
    name: Name, body: LaunchIn, request: Request, principal: Operator, store: Store
) -> LaunchOut:
    """Start a run with typed parameters (checked against the workflow's signature:
    a 422 names each bad parameter in `details.problems`). The run is recorded as
    queued (PENDING) and returned at once; follow it with GET /runs/{id} or the
    event stream."""
    from keel.scheduler.launch import Launch, insert_runs, prepare

    wf = _entry(request, name).workflow
    try:
        params = check_params(wf, body.params)
    except ParameterError as exc:
        raise ApiError(
            422,
            "invalid_parameters",
            exc.message,
            {"problems": getattr(exc, "problems", []), "hint": exc.hint},
        ) from None
    prepare(store, wf)
    item = Launch(
        workflow=wf,
        params=params,
        queue=body.queue or wf.queue,
        priority=wf.priority if body.priority is None else body.priority,
        tags={"keel.launched_by": principal.name},
    )
    with store.engine.begin() as conn:
        insert_runs(conn, store, [item])
    dispatch = body.dispatch or dispatch_of(request.app.state)
    if dispatch == "server":
        runner_of(request.app.state).follow(item.run_id)
    row = store.get_run(item.run_id)
    return LaunchOut(run=run_out(row), dispatch=dispatch)
