"""`keel serve MODEL_URI --on ray`: the model endpoint as a Ray Serve application.

The same routes and answers as the local server (`model_app.py`): `POST /invocations`
(MLflow's scoring protocol and the signature check, from `protocol.py` and
`checks.py`), `GET /ping`, `/version` and `/health`, on the Ray cluster that
`KEEL_RAY_ADDRESS` names or a local Ray (the connection of `executors/ray_executor`).

What Ray Serve adds: replicas (a fixed `replicas` count, or Ray Serve's
`autoscaling_config` passed through as given) and its own batching: concurrent
requests to a replica are gathered by `@serve.batch` (at most `max_batch_size`
requests, waiting up to `batch_wait_ms`), their rows joined into one `predict` and
split back per request. Each replica holds its own `ModelSlot`, so each follows the
alias on its own and switches versions with no request failing.

The process that runs `keel serve --on ray` is the application's owner: it loads
the model once first (so an unknown model or unloadable flavor fails the start with
the same errors as the local server), records the deployment in the store (the
replica count as `workers`) and heartbeats it, and on SIGTERM/SIGINT deletes the
application and exits. Replicas read the store through the `KEEL_*` variables of
this process (passed in their runtime_env), so on a multi-machine cluster the store
must be one every node reaches (PostgreSQL, shared artifact storage).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from keel import __version__
from keel.errors import ServingError
from keel.serving import checks, protocol
from keel.serving.batching import _predict_batch
from keel.serving.model_app import VERSION_HEADER, _reporter, health_of
from keel.serving.model_slot import ModelSlot, Served
from keel.serving.options import ServeOptions
from keel.serving.protocol import ProtocolError
from keel.serving.record import Record
from keel.serving.runner import ServerHandle
from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.serving")

KIND = "model-on-ray"  # the deployment's `kind` in the store
APP_PREFIX = "keel-"
# Ray Serve's own settings the autoscaling JSON may carry are checked by Ray Serve;
# these are the two keel spells as options.
_REPLICA_KEYS = ("min_replicas", "max_replicas")


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RayServeOptions:
    """How many replicas: a fixed count, or Ray Serve's autoscaling_config."""

    replicas: int = 1
    autoscaling: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        replicas: int | None = None,
        autoscaling: str | dict[str, Any] | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
    ) -> RayServeOptions:
        """Checked options: `autoscaling` (a JSON object or a dict, passed to Ray Serve
        as its autoscaling_config) or `min_replicas`/`max_replicas`, or `replicas`."""
        config = _autoscaling(autoscaling)
        for key, value in (("min_replicas", min_replicas), ("max_replicas", max_replicas)):
            if value is not None:
                _count(key, value, zero=key == "min_replicas")
                config = {**(config or {}), key: value}
        if config is not None and replicas is not None:
            raise ServingError(
                "give either a replica count or autoscaling, not both",
                hint="Drop --replicas, or drop --autoscaling/--min-replicas/--max-replicas",
            )
        if config is not None:
            low, high = config.get("min_replicas", 1), config.get("max_replicas", 1)
            if isinstance(low, int) and isinstance(high, int) and low > high:
                raise ServingError(
                    f"min_replicas ({low}) is more than max_replicas ({high})",
                    hint="e.g. --min-replicas 1 --max-replicas 4",
                )
            return cls(replicas=max(1, int(config.get("min_replicas", 1))), autoscaling=config)
        return cls(replicas=_count("replicas", 1 if replicas is None else replicas))

    def deployment_options(self) -> dict[str, Any]:
        if self.autoscaling is not None:
            return {"autoscaling_config": self.autoscaling}
        return {"num_replicas": self.replicas}


def _count(name: str, value: Any, zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        raise ServingError(
            f"{name} must be a whole number of at least {0 if zero else 1}, got {value!r}",
            hint=f"e.g. --{name.replace('_', '-')} 2",
        )
    return value


def _autoscaling(value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return None if value is None else dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ServingError(
            f"--autoscaling is not valid JSON: {exc}",
            hint='e.g. --autoscaling \'{"min_replicas": 1, "max_replicas": 4}\'',
        ) from None
    if not isinstance(parsed, dict):
        raise ServingError(
            f"--autoscaling must be a JSON object (Ray Serve's autoscaling_config), "
            f"got {type(parsed).__name__}",
            hint='e.g. --autoscaling \'{"min_replicas": 1, "max_replicas": 4}\'',
        )
    return parsed


# -- the replica -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    served: Served
    value: Any = None
    error: BaseException | None = None


class ModelReplica:
    """One Ray Serve replica of the model endpoint (made a deployment in `deploy`)."""

    def __init__(self, uri: str, options: dict[str, Any]) -> None:
        from keel.store.metadata import open_store

        self.options = ServeOptions(**options)
        store = open_store()
        self.slot = ModelSlot(store, uri, poll_seconds=self.options.poll_seconds)
        if self.options.deployment_id is not None:
            self.slot.on_change = _reporter(store, self.options.deployment_id)
        self.slot.start()  # the replica is healthy only once it can predict
        # The class reaches the replica by reference (this module imported afresh).
        _with_serve_batch()
        batched: Any = self._batched
        batched.set_max_batch_size(self.options.max_batch_size)
        batched.set_batch_wait_timeout_s(self.options.batch_wait_ms / 1000.0)

    def __del__(self) -> None:
        slot = getattr(self, "slot", None)
        if slot is not None:
            slot.stop()

    async def __call__(self, request: Request) -> Response:
        path = request.scope.get("path", "/")
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        route = path.rstrip("/") or "/"
        method = request.method
        if route == "/invocations" and method == "POST":
            return await self._invoke(request)
        if method == "GET" and route == "/ping":
            return PlainTextResponse("\n")
        if method == "GET" and route == "/version":
            slot = self.slot
            return JSONResponse(
                {"model": slot.name, "uri": slot.uri, "version": slot.version, "keel": __version__}
            )
        if method == "GET" and route == "/health":
            return JSONResponse({**health_of(self.slot), "node": socket.gethostname()})
        known = route in ("/invocations", "/ping", "/version", "/health")
        return PlainTextResponse(
            "Method Not Allowed" if known else "Not Found", 405 if known else 404
        )

    async def _invoke(self, request: Request) -> Response:
        served = self.slot.current
        opts = self.options
        try:
            assert served is not None  # loaded in __init__, before Ray routes here
            body = await _read_capped_body(request, opts.max_body_bytes)
            parsed = protocol.parse(body, request.headers.get("content-type"))
            data = checks.checked(served.model, parsed)
            # serve.batch turns `_batched(parts)` into a call per request's data.
            batched: Callable[[Any], Awaitable[_Outcome]] = self._batched  # type: ignore[assignment]
            call = batched(data) if served.batchable else _one(served, data)
            outcome = await asyncio.wait_for(call, opts.request_timeout)
            if outcome.error is not None:
                raise outcome.error
            return Response(
                protocol.reply(outcome.value),
                media_type="application/json",
                headers={VERSION_HEADER: str(outcome.served.version)},
            )
        except ProtocolError as exc:
            return JSONResponse(exc.body(), exc.status)
        except TimeoutError:
            err = ProtocolError(
                504,
                "TIMEOUT",
                f"the prediction took longer than the request timeout ({opts.request_timeout} s)",
            )
            return JSONResponse(err.body(), 504)
        except Exception as exc:  # the model raised: the request fails, the replica stays up
            err = ProtocolError(
                500,
                "MODEL_ERROR",
                f"the model raised {type(exc).__name__}: {exc}",
                {"type": type(exc).__name__, "message": str(exc)},
            )
            return JSONResponse(err.body(), 500)

    async def _batched(self, parts: list[Any]) -> list[_Outcome]:
        """Ray Serve's batch of concurrent requests' data: one predict for all, or one
        per request when that fails, so an error is the request's own. Replaced by
        the `serve.batch`-wrapped version below (its sizes are set per replica)."""
        served = self.slot.current
        assert served is not None
        # A thread, so the replica's event loop gathers the next batch meanwhile.
        return await asyncio.to_thread(_predict_parts, served, parts)


def _predict_parts(served: Served, parts: list[Any]) -> list[_Outcome]:
    try:
        joined = _predict_batch(served, parts)
    except Exception:
        joined = None
    if joined is not None:
        return [_Outcome(served, value) for value in joined]
    outcomes = []
    for part in parts:
        try:
            outcomes.append(_Outcome(served, served.predict(part)))
        except Exception as exc:
            outcomes.append(_Outcome(served, error=exc))
    return outcomes


async def _one(served: Served, data: Any) -> _Outcome:
    """A model that cannot batch: called for this request alone, on a thread."""
    try:
        return _Outcome(served, await asyncio.to_thread(served.predict, data))
    except Exception as exc:
        return _Outcome(served, error=exc)


def _with_serve_batch() -> None:
    """Wrap `ModelReplica._batched` with `serve.batch` once Ray Serve is imported (this
    module imports without Ray; only `--on ray` needs it)."""
    from ray import serve

    if not getattr(ModelReplica, "_keel_batched", False):
        wrapped: Any = serve.batch(cast(Any, ModelReplica._batched))
        ModelReplica._batched = wrapped  # type: ignore[method-assign]
        ModelReplica._keel_batched = True  # type: ignore[attr-defined]


# -- deploying and running -------------------------------------------------------------------


class RayServeHandle(ServerHandle):
    """A Ray Serve application owned by this process (`keel.serve(..., on="ray",
    background=True)`): `.url`, `.app_name`, `.stop()` deletes it."""

    def __init__(
        self, url: str, deployment_id: str, app_name: str, stop: Callable[[], None]
    ) -> None:
        super().__init__(url, deployment_id, stop)
        self.app_name = app_name
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            super().stop()

    def __repr__(self) -> str:
        return f"<keel server {self.url} on Ray Serve ({self.app_name})>"


def serve_on_ray(
    uri: str,
    options: ServeOptions,
    scale: RayServeOptions,
    *,
    background: bool = False,
    announce: Callable[[str], None] | None = None,
) -> RayServeHandle | None:
    """Deploy the endpoint of `uri` on Ray Serve; block until SIGTERM/SIGINT (then
    delete it), or with `background` return a handle at once."""
    from keel.executors.ray_executor import connect
    from keel.store.metadata import open_store

    if options.workers != 1:
        raise ServingError(
            "--workers is for the local server; on Ray the replicas serve",
            hint="Use --replicas N (or --min-replicas/--max-replicas) with --on ray",
        )
    store = open_store()
    # Resolve and load here first: an unknown model, alias or flavor fails the start
    # with the local server's errors, before anything is deployed.
    probe = ModelSlot(store, uri, poll_seconds=0)
    served = probe.load(probe.resolve())
    del served
    connect()
    _with_serve_batch()
    with ExitStack() as signals:
        # From here on a SIGTERM/SIGINT only asks to stop: a deploy under way finishes
        # and is then deleted, never left behind (Ray's driver handler would exit).
        stopped = threading.Event() if background else signals.enter_context(_until_signal())
        return _deploy_and_run(uri, options, scale, store, probe, background, announce, stopped)


def _deploy_and_run(
    uri: str,
    options: ServeOptions,
    scale: RayServeOptions,
    store: MetadataStore,
    probe: ModelSlot,
    background: bool,
    announce: Callable[[str], None] | None,
    stopped: threading.Event,
) -> RayServeHandle | None:
    from ray import serve

    host, port = _start_serve(options)
    deployment_id = uuid.uuid4().hex[:16]
    app_name = f"{APP_PREFIX}{deployment_id}"
    options = replace(options, host=host, port=port, deployment_id=deployment_id)
    record = Record(
        store,
        {
            "id": deployment_id,
            "target": uri,
            "kind": KIND,
            "model": probe.name,
            "version": probe.resolve(),
            "host": host,
            "port": port,
            "workers": scale.replicas,
            "pid": os.getpid(),
            "machine": socket.gethostname()[:200],
        },
    )
    try:
        _deploy(serve, uri, options, scale, app_name)
    except BaseException:
        record.stop()
        raise
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"

    def stop() -> None:
        try:
            serve.delete(app_name)
        except Exception as exc:
            log.warning("keel serve: could not delete the Ray Serve app %s: %s", app_name, exc)
        record.stop()

    try:
        _wait_ready(url)
    except BaseException:
        stop()
        raise
    if background:
        return RayServeHandle(url, deployment_id, app_name, stop)
    if announce is not None and not stopped.is_set():
        announce(url)
    try:
        while not stopped.wait(0.5):  # a timed wait lets the handler run promptly
            pass
    finally:
        stop()
    return None


def _deploy(
    serve: Any, uri: str, options: ServeOptions, scale: RayServeOptions, app_name: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k.startswith("KEEL_")}
    deployment = serve.deployment(
        ModelReplica,
        name="model",
        # Room for a full batch queued behind the one predicting.
        max_ongoing_requests=max(8, 2 * options.max_batch_size),
        ray_actor_options={"runtime_env": {"env_vars": env}},
        **scale.deployment_options(),
    )
    try:
        serve.run(
            deployment.bind(uri, options.to_dict()),
            name=app_name,
            route_prefix="/",
            blocking=False,
        )
    except Exception as exc:
        try:
            serve.delete(app_name)
        except Exception as cleanup:
            log.warning("keel serve: could not delete %s: %s", app_name, cleanup)
        raise ServingError(
            f"Ray Serve did not deploy {uri}: {type(exc).__name__}: {exc}",
            hint="Check the replicas' log (Ray's session logs); another application may "
            "already serve the route prefix / on this cluster (`serve status`)",
        ) from None


def _start_serve(options: ServeOptions) -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port, or find the one the cluster runs: its
    address is the cluster's, fixed when Serve first started there."""
    from ray import serve
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False)
    if running is None:
        port = options.port
        if port == 0 or _is_local():
            # Ray's proxy starts in another process: check the port here first, so a
            # taken one is one clear error (and 0 picks a free one).
            from keel.serving.listening import bind

            sock = bind(options.host, port)
            port = sock.getsockname()[1]
            sock.close()
        serve.start(http_options={"host": options.host, "port": port})
        running = _get_global_client()
    assert running is not None
    config = running.http_config
    host, port = str(config.host), int(config.port)
    if (options.port not in (0, port)) or options.host != host:
        log.warning(
            "keel serve: Ray Serve already runs on this cluster at %s:%s; serving there "
            "(its address is fixed when Serve starts)",
            host,
            port,
        )
    return host, port


def _is_local() -> bool:
    from keel.executors import ray_executor

    return bool(getattr(ray_executor, "_started_by_keel", False))


@contextmanager
def _until_signal() -> Iterator[threading.Event]:
    """An event set by SIGTERM or SIGINT (replacing Ray's driver handler, which would
    exit with the signal's number rather than let the app be deleted and exit 0)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return

    def handler(sig: int, frame: Any) -> None:
        stopped.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _wait_ready(url: str, bound: float = 120.0) -> None:
    """Wait until `url`/ping answers 200 (Ray's proxy can lag the deployment)."""
    import httpx

    end = time.monotonic() + bound
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/ping", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise ServingError(f"{url}/ping did not answer within {bound:.0f} s")


async def _read_capped_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (Ray Serve's
    proxy runs no keel guard to cap it): by its Content-Length before reading, else
    while the bytes stream in."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, None)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int, size: int | None) -> ProtocolError:
    told = f" ({size} bytes)" if size is not None else ""
    return ProtocolError(
        413,
        "PAYLOAD_TOO_LARGE",
        f"the body{told} is larger than the limit of {limit} bytes",
        {"limit": limit},
    )
