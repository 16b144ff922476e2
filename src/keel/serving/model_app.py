"""The model endpoint: an ASGI app that serves one model URI.

Routes: `POST /invocations` (MLflow's scoring protocol, see `protocol.py`), `GET /ping`
(200 once a version is loaded, 503 before), `GET /version`, `GET /health` (JSON:
model, version, state, last reload error, the inference log's counts) and
`GET /metrics` (Prometheus text). Each request is counted in `Traffic` (what the
heartbeat writes) and, with `--log-requests`, offered to the inference log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keel import __version__
from keel.serving import checks, gate, protocol
from keel.serving.batching import Batcher
from keel.serving.metrics import CONTENT_TYPE, ServingMetrics
from keel.serving.model_slot import ModelSlot, Served
from keel.serving.options import ServeOptions
from keel.serving.protocol import ProtocolError
from keel.serving.request_log import RequestLog
from keel.serving.traffic import Traffic
from keel.store.metadata import MetadataStore

VERSION_HEADER = "X-Keel-Model-Version"


def create_model_app(
    uri: str,
    options: ServeOptions | None = None,
    *,
    store: MetadataStore | None = None,
    slot: ModelSlot | None = None,
    load_first: bool = False,
) -> Starlette:
    """The endpoint of `uri`, behind the guard (serving/gate.py: Host, Origin, content
    type, token and body cap, as `options` say). Given a started `slot` it serves at
    once. Otherwise it loads the model at startup: before accepting connections with
    `load_first` (what each `--workers` process does, so none answers before it can
    predict), else in the background while /ping answers 503."""
    from keel.store.metadata import open_store

    opts = options or ServeOptions()
    if slot is None:
        slot = ModelSlot(store or open_store(), uri, poll_seconds=opts.poll_seconds)
    if opts.deployment_id is not None:
        slot.on_change = _reporter(slot.store, opts.deployment_id)
        if slot.current is not None:  # loaded before the record existed: report it now
            slot.report()
    metrics = ServingMetrics()
    traffic = Traffic()
    request_log = None
    if opts.log_requests:
        request_log = RequestLog(
            slot.store,
            deployment_id=opts.deployment_id,
            sample_rate=opts.log_sample_rate,
            queue_size=opts.log_queue_size,
            on_drop=metrics.log_dropped.inc,
            on_write=metrics.log_written.inc,
        )

    def on_batch(served: Served, rows: int) -> None:
        metrics.batch(served.name or slot.uri, str(served.version), rows)

    def current() -> Served:
        assert slot.current is not None
        return slot.current

    batcher = Batcher(
        current, max_rows=opts.max_batch_size, wait_ms=opts.batch_wait_ms, on_batch=on_batch
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        batcher.start()
        if request_log is not None:
            request_log.start()
        loading = None
        if slot.current is None and load_first:
            await asyncio.to_thread(slot.start)
        elif slot.current is None:
            loading = asyncio.get_running_loop().run_in_executor(None, _start, slot)
        try:
            yield
        finally:
            await batcher.stop()
            if request_log is not None:
                await asyncio.to_thread(request_log.stop, opts.graceful_timeout)
            slot.stop()
            if loading is not None:
                await asyncio.wait([loading], timeout=1)

    async def invocations(request: Request) -> Response:
        metrics.in_flight.inc()
        try:
            return await _invoke(request)
        finally:
            metrics.in_flight.dec()

    async def _invoke(request: Request) -> Response:
        started, arrived = time.perf_counter(), time.time()
        served = slot.current
        label = (served.name or slot.uri, str(served.version)) if served else (slot.uri, "")
        data = out = None
        try:
            if served is None:
                raise ProtocolError(503, "NOT_READY", "the model is not loaded yet")
            body = await request.body()  # capped by the guard at --max-body-bytes
            parsed = protocol.parse(body, request.headers.get("content-type"))
            data = checks.checked(served.model, parsed)
            used, out = await asyncio.wait_for(
                batcher.predict(served, data, protocol.rows(data)), opts.request_timeout
            )
            label = (used.name or slot.uri, str(used.version))
            served = used
            reply = Response(
                protocol.reply(out),
                media_type="application/json",
                headers={VERSION_HEADER: str(used.version)},
            )
            code = None
        except ProtocolError as exc:
            reply, code = JSONResponse(exc.body(), exc.status), exc.code
        except TimeoutError:
            err = ProtocolError(
                504,
                "TIMEOUT",
                f"the prediction took longer than the request timeout ({opts.request_timeout} s)",
            )
            reply, code = JSONResponse(err.body(), 504), err.code
        except Exception as exc:  # the model raised: the request fails, the server stays up
            err = ProtocolError(
                500,
                "MODEL_ERROR",
                f"the model raised {type(exc).__name__}: {exc}",
                {"type": type(exc).__name__, "message": str(exc)},
            )
            reply, code = JSONResponse(err.body(), 500), err.code
        seconds = time.perf_counter() - started
        metrics.observe(*label, reply.status_code, seconds, code)
        traffic.observe(seconds, reply.status_code >= 400)
        if request_log is not None and served is not None:
            request_log.offer(
                label[0], served.version, arrived, seconds, reply.status_code, data, out
            )
        return reply

    async def ping(request: Request) -> Response:
        ready = slot.current is not None
        return PlainTextResponse("\n" if ready else "loading\n", 200 if ready else 503)

    async def version(request: Request) -> Response:
        return JSONResponse(
            {"model": slot.name, "uri": slot.uri, "version": slot.version, "keel": __version__}
        )

    async def health(request: Request) -> Response:
        body = health_of(slot)
        body["inference_log"] = request_log.state() if request_log is not None else None
        return JSONResponse(body, 200 if slot.current is not None else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app = Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.slot = slot
    app.state.metrics = metrics
    app.state.traffic = traffic
    app.state.request_log = request_log
    gate.guard(app, slot.store, opts, gate.model_policy())
    return app


def health_of(slot: ModelSlot) -> dict[str, Any]:
    served = slot.current
    return {
        "model": slot.name,
        "uri": slot.uri,
        "version": slot.version,
        "state": slot.state,
        "follows_alias": slot.follows,
        "batchable": served.batchable if served is not None else None,
        "reloads": slot.reloads,
        "last_error": slot.last_error,
        "pid": os.getpid(),
    }


def _start(slot: ModelSlot) -> None:
    try:
        slot.start()
    except Exception as exc:
        slot.state = "failed"
        slot.last_error = f"{type(exc).__name__}: {exc}"
        slot.report()


def _reporter(store: MetadataStore, deployment_id: str) -> Any:
    from keel.store import deployments

    def report(slot: ModelSlot) -> None:
        deployments.update(
            store,
            deployment_id,
            version=slot.version,
            state="serving" if slot.current is not None else "starting",
            last_error=slot.last_error,
        )

    return report
