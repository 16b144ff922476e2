"""A workflow as an HTTP endpoint (`keel serve flows.py:search`).

- `POST /run` with the workflow's parameters as a JSON object runs it and answers
  `{"result": ...}` (numpy arrays and pandas frames become lists and records).
  Recorded mode (the default) makes each call a durable run, as `keel.run` does,
  and adds its `run_id`; `ephemeral=True` runs the steps in memory
  (serving/ephemeral.py) and writes nothing to the store.
- `POST /runs` (recorded mode) records the run as queued and answers 202 with its
  id and a `Location` to the REST run at once; a thread of this process then claims
  and runs it, and if the process dies the queue entry lets any worker finish it.
  `GET /runs/{id}` reads its status (and result or error), for runs of this
  workflow only (any other id is 404).
- `GET /ping` and `GET /health`.

The guard (serving/gate.py) stands in front: Host, Origin, JSON bodies only, the
caller's token and role, the body cap, all before the body is read.

Errors are JSON `{"error": {"code", "message", "details"}}` like the REST API's:
400 bad JSON, 422 a parameter (named), 500 a workflow that raised (its type and
message); the server stays up. While the app runs (between its lifespan's startup
and shutdown), `keel.load_model` in the process, so in the workflow's tasks, is
answered from the process's model cache, which follows aliases (model_cache.py).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from keel.errors import KeelError, ParameterError, RunFailedError, qualified_name
from keel.serving import model_cache
from keel.serving.ephemeral import run_ephemeral

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

    from keel.sdk.definitions import Workflow
    from keel.serving.options import ServeOptions
    from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.serving")

DEFAULT_STEP_THREADS = 32


def jsonable(value: Any) -> Any:
    """A workflow's result as JSON data: numpy arrays and scalars, pandas frames
    (as records) and series become lists and numbers; TypeError for anything else."""
    from pydantic_core import to_jsonable_python

    return to_jsonable_python(value, fallback=_fallback)


def _fallback(value: Any) -> Any:
    module = type(value).__module__
    if module.startswith("numpy"):
        if hasattr(value, "tolist"):
            return value.tolist()
    elif module.startswith("pandas"):
        if hasattr(value, "to_dict") and hasattr(value, "columns"):
            return jsonable(value.to_dict(orient="records"))
        if hasattr(value, "tolist"):
            return jsonable(value.tolist())
    raise TypeError(f"a {qualified_name(type(value))} is not JSON data")


def _error(status: int, code: str, message: str, **details: Any) -> Response:
    from starlette.responses import JSONResponse

    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(body, status_code=status)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import Response

    text = json.dumps(body, separators=(",", ":"))
    return Response(text, status_code=status, media_type="application/json", headers=headers)


class WorkflowEndpoint:
    """What the routes share: the workflow, its mode, the store, the step pool."""

    def __init__(
        self,
        workflow: Workflow[Any, Any],
        *,
        ephemeral: bool,
        store: MetadataStore | None,
        step_threads: int,
    ) -> None:
        self.workflow = workflow
        self.ephemeral = ephemeral
        self._store = store
        self._store_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(step_threads, thread_name_prefix="keel-serve-step")
        self.cache = model_cache.shared()
        # Tasks of ephemeral runs that load models read this store (by its URL).
        self.db_url = store.url if store is not None else ""
        self.artifacts_url = store.config.artifacts_url if store is not None else ""

    @property
    def store(self) -> MetadataStore:
        with self._store_lock:
            if self._store is None:
                from keel.store.metadata import open_store

                self._store = open_store()
            return self._store

    @property
    def mode(self) -> str:
        return "ephemeral" if self.ephemeral else "recorded"

    # -- requests -------------------------------------------------------------------
    async def params(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        try:
            given = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            return _error(400, "bad_json", f"the body is not valid JSON: {exc}")
        if not isinstance(given, dict):
            return _error(
                400,
                "bad_json",
                f"the body must be a JSON object of parameters, got {type(given).__name__}",
                parameters=self.workflow.validator.describe(),
            )
        try:
            return self.workflow.validate(given, require_json=not self.ephemeral)
        except ParameterError as exc:
            return _error(
                422,
                "invalid_parameter",
                exc.message,
                parameters=self.workflow.validator.describe(),
            )

    def call(self, params: dict[str, Any]) -> tuple[Any, str | None]:
        """Run the workflow to its end on this thread: (result, run id if recorded)."""
        if self.ephemeral:
            value = run_ephemeral(
                self.workflow,
                params,
                self.pool,
                db_url=self.db_url,
                artifacts_url=self.artifacts_url,
            )
            return value, None
        from keel.engine.api import new_session, start_run

        session = new_session(store=self.store, executor=self.workflow.executor)
        handle = start_run(self.workflow, params, session=session, validated=True)
        return handle.result(), handle.id

    def start(self, params: dict[str, Any]) -> str:
        """Record the run as queued (durable from here on), follow it on a thread."""
        from keel.engine.api import new_session
        from keel.engine.execute import new_run_row, record_new_run
        from keel.ids import new_run_id
        from keel.status import RunStatus
        from keel.store import queue

        wf = self.workflow
        store = self.store
        session = new_session(store=store, executor=wf.executor)
        run_id = new_run_id()
        row = new_run_row(store, run_id, wf, wf.validator.to_json(params), executor=wf.executor)
        row.update(status=str(RunStatus.PENDING), started_at=None, queue=wf.queue)
        record_new_run(session, row, params)
        session.recorder.flush()
        session.close()
        queue.enqueue_run(store, run_id, queue=wf.queue, priority=wf.priority)
        threading.Thread(
            target=self._follow, args=(run_id,), name=f"keel-serve-{run_id}", daemon=True
        ).start()
        return run_id

    def _follow(self, run_id: str) -> None:
        from keel.engine.api import resume

        try:
            resume(run_id, store=self.store)
        except Exception as exc:  # recorded on the run by the engine; the queue keeps it
            log.error("run %s did not finish here: %s", run_id, exc)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def create_workflow_app(
    ref: str,
    *,
    ephemeral: bool = False,
    store: MetadataStore | None = None,
    step_threads: int = DEFAULT_STEP_THREADS,
    model_check_interval: float | None = None,
    options: ServeOptions | dict[str, Any] | None = None,
) -> Starlette:
    """The ASGI app serving the workflow `ref` (`flows.py:search` or `module:name`,
    found as `keel run` finds it). `store`: where recorded runs go, models are read
    and API tokens checked (default: KEEL_DB_URL / KEEL_HOME). `step_threads`: the
    ephemeral steps' pool. `model_check_interval`: seconds between alias checks of
    loaded models. `options`: the bound host, allowed host names, body cap and
    `insecure_no_auth` the guard goes by (default: a loopback server)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from keel.sdk.loader import load_workflow
    from keel.serving import gate
    from keel.serving.options import ServeOptions
    from keel.store.metadata import open_store

    opts = ServeOptions(**options) if isinstance(options, dict) else options or ServeOptions()
    # Opened even for ephemeral runs: the guard reads the store's API tokens.
    store = store or open_store()
    endpoint = WorkflowEndpoint(
        load_workflow(ref), ephemeral=ephemeral, store=store, step_threads=step_threads
    )
    if model_check_interval is not None:
        endpoint.cache.check_interval = model_check_interval
    name = endpoint.workflow.name

    async def run(request: Request) -> Response:
        params = await endpoint.params(request)
        if not isinstance(params, dict):
            return params
        try:
            value, run_id = await run_in_threadpool(endpoint.call, params)
        except RunFailedError as exc:
            kind = exc.error_type or "RunFailedError"
            return _error(500, "workflow_failed", exc.message, type=kind, run_id=exc.run_id)
        except Exception as exc:
            message = exc.message if isinstance(exc, KeelError) else str(exc)
            kind = qualified_name(type(exc))
            return _error(500, "workflow_failed", f"{kind}: {message}", type=kind)
        try:
            body: dict[str, Any] = {"result": jsonable(value)}
        except TypeError as exc:
            return _error(
                500,
                "result_not_json",
                f"workflow {name} returned a result that is not JSON data: {exc}",
                run_id=run_id,
            )
        if run_id is not None:
            body["run_id"] = run_id
        return _json(body)

    async def start(request: Request) -> Response:
        if endpoint.ephemeral:
            return _error(
                409,
                "not_recorded",
                f"workflow {name} is served ephemeral: its runs are not recorded",
                hint="POST /run answers with the result; serve without --ephemeral for "
                "durable runs",
            )
        params = await endpoint.params(request)
        if not isinstance(params, dict):
            return params
        run_id = await run_in_threadpool(endpoint.start, params)
        url = f"/api/v1/runs/{run_id}"
        body = {"run_id": run_id, "status": "PENDING", "url": url, "status_url": f"/runs/{run_id}"}
        return _json(body, 202, headers={"Location": url})

    async def status(request: Request) -> Response:
        if endpoint.ephemeral:
            return _error(409, "not_recorded", f"workflow {name} is served ephemeral")
        run_id = request.path_params["run_id"]
        return await run_in_threadpool(_run_status, endpoint.store, run_id, name)

    async def ping(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def health(request: Request) -> Response:
        return _json(
            {
                "status": "ok",
                "workflow": name,
                "mode": endpoint.mode,
                "parameters": endpoint.workflow.validator.describe(),
                "models": endpoint.cache.status(),
            }
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # While the app runs, `keel.load_model` in the process answers from the cache.
        model_cache.install()
        try:
            yield
        finally:
            model_cache.uninstall()
            endpoint.close()

    app = Starlette(
        routes=[
            Route("/run", run, methods=["POST"]),
            Route("/runs", start, methods=["POST"]),
            Route("/runs/{run_id}", status, methods=["GET"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.endpoint = endpoint
    gate.guard(app, store, opts, gate.workflow_policy(ephemeral))
    return app


def _run_status(store: MetadataStore, run_id: str, workflow: str) -> Response:
    from keel.client import Client
    from keel.errors import RunNotFoundError

    try:
        run = Client(store=store).run(run_id)
    except RunNotFoundError as exc:
        return _error(404, "run_not_found", exc.message)
    if run.workflow != workflow:  # this endpoint answers for its own workflow's runs only
        return _error(404, "run_not_found", f"no run {run_id!r} of workflow {workflow}")
    body: dict[str, Any] = {"run_id": run.id, "status": str(run.status)}
    if run.status == "SUCCEEDED":
        try:
            body["result"] = jsonable(run.result())
        except TypeError as exc:
            body["result_error"] = str(exc)
    elif run.error_type:
        body["error"] = {"type": run.error_type, "message": run.error_message}
    return _json(body)
