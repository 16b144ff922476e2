"""Running an endpoint: `keel.serve` and `keel serve`.

`serve(target, ...)` serves a model URI (`models:/...`, `runs:/...`) with the model
endpoint of `model_app.py`, or anything else (`flows.py:search`) with the workflow
endpoint's factory, `keel.serving.workflow_app.create_workflow_app`. Any ASGI app
factory runs the same way (`serve_factory`), in one process or in `workers`
processes sharing one listening socket (uvicorn's supervisor, each worker building
the app from the spec in `KEEL_SERVE_SPEC`).

What the runner adds around uvicorn:
- the socket is bound first, so a taken port is one clear error before anything else;
- a model URI is resolved and loaded before the server says it serves, so an unknown
  model, alias or unloadable flavor stops the start with a typed error;
- the deployment's row in the store: written at start, a heartbeat every few seconds
  from a thread, marked stopped at exit;
- SIGTERM and SIGINT shut down gracefully (no new connections, in-flight requests
  finish within `graceful_timeout`) and the process exits 0.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from keel.errors import ServingError
from keel.serving.listening import bind, graceful_signals
from keel.serving.options import ServeOptions
from keel.serving.record import Record
from keel.store.metadata import MetadataStore

SPEC_ENV = "KEEL_SERVE_SPEC"
WORKFLOW_FACTORY = "keel.serving.workflow_app:create_workflow_app"
MODEL_FACTORY = "keel.serving.runner:model_app_from_spec"
_MODEL_PREFIXES = ("models:/", "runs:/")


def is_model_target(target: str) -> bool:
    return target.strip().startswith(_MODEL_PREFIXES)


# -- building apps in worker processes -------------------------------------------------------


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def app_from_env() -> Any:
    """The app factory uvicorn calls in each worker process."""
    spec = json.loads(os.environ[SPEC_ENV])
    return _import(spec["factory"])(*spec.get("args", []), **spec.get("kwargs", {}))


def model_app_from_spec(uri: str, options: dict[str, Any]) -> Any:
    from keel.serving.model_app import create_model_app

    return create_model_app(uri, ServeOptions(**options), load_first=True)


# -- serving -------------------------------------------------------------------------------


class ServerHandle:
    """A server running in a background thread (`keel.serve(..., background=True)`)."""

    def __init__(self, url: str, deployment_id: str, stop: Callable[[], None]) -> None:
        self.url = url
        self.deployment_id = deployment_id
        self._stop = stop

    def stop(self) -> None:
        """Shut down gracefully and wait for the thread (in-flight requests finish)."""
        self._stop()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<keel server {self.url}>"


def serve(
    target: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    max_batch_size: int = 32,
    batch_wait_ms: float = 0.0,
    max_body_bytes: int | None = None,
    request_timeout: float = 30.0,
    graceful_timeout: float = 10.0,
    poll_seconds: float = 1.0,
    log_requests: bool = False,
    log_sample_rate: float = 1.0,
    log_queue_size: int = 10_000,
    ephemeral: bool = False,
    background: bool = False,
    announce: Callable[[str], None] | None = None,
    on: str = "local",
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    autoscaling: str | dict[str, Any] | None = None,
    allowed_hosts: tuple[str, ...] | list[str] = (),
    insecure_no_auth: bool = False,
) -> ServerHandle | None:
    """Serve `target` over HTTP: a model URI (`models:/digits@champion`) or a workflow
    (`flows.py:search`). Blocks until SIGTERM/SIGINT; with `background=True` returns a
    `ServerHandle` (`.url`, `.stop()`) at once, serving from a thread (port 0 picks a
    free port). Beyond loopback it needs an API token to exist first (callers send
    it), unless `insecure_no_auth`; `allowed_hosts`: more names callers may use in
    `Host` (docs/serving.md, "Who can call it").

    `on="ray"` deploys a model URI as a Ray Serve application instead (see
    `keel.serving.on_ray`): `replicas`, or Ray Serve's autoscaling_config as
    `autoscaling` (a dict or JSON) or `min_replicas`/`max_replicas`. Ray Serve's proxy
    does not run keel's guard, so it listens beyond loopback only with
    `insecure_no_auth`.

    `log_requests` writes the inputs, predictions, version, latency and status of
    a `log_sample_rate` share of a model's requests to the store's inference log
    (read with `keel.inference_log`), from a background thread; at most
    `log_queue_size` requests wait for it, more are dropped and counted."""
    from keel.serving.gate import check_exposure
    from keel.serving.options import DEFAULT_MAX_BODY
    from keel.store.metadata import open_store

    if not isinstance(target, str) or not target.strip():
        raise ServingError(
            f"the target must be a model URI or a workflow reference, got {target!r}",
            hint="e.g. models:/digits@champion or flows.py:search",
        )
    options = ServeOptions(
        host=host,
        port=port,
        workers=workers,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        max_body_bytes=max_body_bytes if max_body_bytes is not None else DEFAULT_MAX_BODY,
        request_timeout=request_timeout,
        poll_seconds=poll_seconds,
        graceful_timeout=graceful_timeout,
        allowed_hosts=tuple(allowed_hosts),
        insecure_no_auth=insecure_no_auth,
        log_requests=log_requests,
        log_sample_rate=log_sample_rate,
        log_queue_size=log_queue_size,
    )
    if log_requests and not is_model_target(target):
        raise ServingError(
            "the inference log records a model's requests; a workflow has none to log",
            hint="Drop --log-requests, or serve a model URI",
        )
    target = target.strip()
    if on not in ("local", "ray"):
        raise ServingError(f"on must be 'local' or 'ray', got {on!r}", hint="e.g. --on ray")
    scaled = (replicas, min_replicas, max_replicas, autoscaling)
    if on == "ray":
        from keel.server.guard import is_loopback
        from keel.serving.on_ray import RayServeOptions, serve_on_ray

        if not is_model_target(target):
            raise ServingError(
                f"--on ray serves model URIs, not {target!r}",
                hint="Serve a workflow without --on ray",
            )
        if not is_loopback(options.host) and not options.insecure_no_auth:
            raise ServingError(
                f"refusing to listen on {options.host} with --on ray: Ray Serve's proxy does "
                "not check keel's API tokens, Host or Origin",
                hint="Listen on 127.0.0.1 behind your gateway, or pass --insecure-no-auth "
                "if the network is yours alone",
            )
        if log_requests:
            raise ServingError(
                "--log-requests is not available with --on ray",
                hint="Serve the model locally (--workers N) to log its requests",
            )
        scale = RayServeOptions.of(replicas, autoscaling, min_replicas, max_replicas)
        return serve_on_ray(target, options, scale, background=background, announce=announce)
    if any(value is not None for value in scaled):
        raise ServingError(
            "replicas and autoscaling are options of --on ray",
            hint="Add --on ray, or use --workers N for the local server",
        )
    check_exposure(open_store(), options)
    if background and workers != 1:
        raise ServingError("a background server runs one process", hint="Use workers=1")
    if is_model_target(target):
        return _serve_model(target, options, background, announce)
    spec = {"factory": WORKFLOW_FACTORY, "args": [target], "kwargs": {"ephemeral": ephemeral}}
    return serve_factory(spec, options, target=target, background=background, announce=announce)


def _serve_model(
    uri: str,
    options: ServeOptions,
    background: bool,
    announce: Callable[[str], None] | None,
) -> ServerHandle | None:
    from keel.serving.model_app import create_model_app
    from keel.serving.model_slot import ModelSlot
    from keel.store.metadata import open_store

    store = open_store()
    sock = bind(options.host, options.port)
    try:
        # Resolve and load here: an unknown model, alias or flavor fails the start.
        slot = ModelSlot(store, uri, poll_seconds=options.poll_seconds)
        served = slot.start() if options.workers == 1 else slot.load(slot.resolve())
    except BaseException:
        sock.close()
        raise
    kind = {"kind": "model", "model": slot.name, "version": served.version}
    if options.workers == 1:
        return _run(
            store,
            sock,
            options,
            uri,
            kind,
            background,
            announce,
            app_for=lambda opts: create_model_app(uri, opts, store=store, slot=slot),
            on_exit=slot.stop,
        )
    del served
    spec = {"factory": MODEL_FACTORY, "args": [uri], "kwargs": {}}
    return _run(store, sock, options, uri, kind, False, announce, spec=spec)


def serve_factory(
    spec: dict[str, Any],
    options: ServeOptions,
    *,
    target: str,
    background: bool = False,
    announce: Callable[[str], None] | None = None,
) -> ServerHandle | None:
    """Serve the app that `spec["factory"]` ("module:function") builds from
    `spec["args"]` and `spec["kwargs"]`: the runner of any ASGI app factory."""
    from keel.store.metadata import open_store

    store = open_store()
    sock = bind(options.host, options.port)
    if options.workers == 1:
        try:
            app = _import(spec["factory"])(*spec.get("args", []), **_with_options(spec, options))
        except BaseException:
            sock.close()
            raise
        return _run(
            store,
            sock,
            options,
            target,
            {"kind": "workflow"},
            background,
            announce,
            app_for=lambda opts: app,
        )
    return _run(store, sock, options, target, {"kind": "workflow"}, False, announce, spec=spec)


def _run(
    store: MetadataStore,
    sock: socket.socket,
    options: ServeOptions,
    target: str,
    kind: dict[str, Any],
    background: bool,
    announce: Callable[[str], None] | None,
    *,
    app_for: Callable[[ServeOptions], Any] | None = None,
    spec: dict[str, Any] | None = None,
    on_exit: Callable[[], None] | None = None,
) -> ServerHandle | None:
    import uvicorn

    port = sock.getsockname()[1]
    deployment_id = uuid.uuid4().hex[:16]
    options = replace(options, port=port, deployment_id=deployment_id)
    try:
        record = Record(
            store,
            {
                "id": deployment_id,
                "target": target,
                "host": options.host,
                "port": port,
                "workers": options.workers,
                "pid": os.getpid(),
                "machine": socket.gethostname()[:200],
                **kind,
            },
        )
    except BaseException:
        sock.close()
        raise
    level = os.environ.get("KEEL_SERVER_LOG_LEVEL", "warning")
    if spec is not None:
        os.environ[SPEC_ENV] = json.dumps({**spec, "kwargs": _with_options(spec, options)})
        config = uvicorn.Config(
            "keel.serving.runner:app_from_env",
            factory=True,
            workers=options.workers,
            log_level=level,
            timeout_graceful_shutdown=math.ceil(options.graceful_timeout),
            access_log=False,
            ws="none",  # no websocket routes; skips importing a websockets stack at start
        )
    else:
        assert app_for is not None
        app = app_for(options)
        traffic = getattr(getattr(app, "state", None), "traffic", None)
        if traffic is not None:  # one process: its heartbeat carries the app's traffic
            record.traffic = traffic.snapshot
        config = uvicorn.Config(
            app,
            log_level=level,
            timeout_graceful_shutdown=math.ceil(options.graceful_timeout),
            access_log=False,
            ws="none",  # no websocket routes; skips importing a websockets stack at start
        )
    server = uvicorn.Server(config)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{shown}:{port}"

    def finish() -> None:
        sock.close()
        if on_exit is not None:
            on_exit()
        record.stop()

    if background:
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            _wait_started(server, thread)
        except BaseException:
            finish()
            raise

        def stop() -> None:
            server.should_exit = True
            thread.join(options.graceful_timeout + 30)
            finish()

        return ServerHandle(url, deployment_id, stop)

    if announce is not None:
        _announce_when_started(server, announce, url, options)
    try:
        with graceful_signals():
            if spec is not None:
                from uvicorn.supervisors import Multiprocess

                Multiprocess(config, sockets=[sock]).run()
            else:
                server.run(sockets=[sock])
    finally:
        finish()
    return None


def _with_options(spec: dict[str, Any], options: ServeOptions) -> dict[str, Any]:
    kwargs = dict(spec.get("kwargs", {}))
    if spec["factory"] in (MODEL_FACTORY, WORKFLOW_FACTORY):
        kwargs["options"] = options.to_dict()
    return kwargs


def _wait_started(server: Any, thread: threading.Thread, bound: float = 60.0) -> None:
    end = time.monotonic() + bound
    while not server.started:
        if not thread.is_alive():
            raise ServingError("the server stopped while starting; see the log above")
        if time.monotonic() > end:
            server.should_exit = True
            raise ServingError(f"the server did not start within {bound:.0f} s")
        time.sleep(0.01)


def _announce_when_started(
    server: Any, announce: Callable[[str], None], url: str, options: ServeOptions
) -> None:
    """Say "serving on ..." only once the server accepts (never before a failure)."""

    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started or options.workers > 1:
            announce(url)

    if options.workers > 1:
        announce(url)  # the socket is bound: the workers accept as they come up
        return
    threading.Thread(target=wait, daemon=True).start()
