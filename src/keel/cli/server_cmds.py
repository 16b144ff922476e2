"""`keel server`, `keel ui` and `keel token`: the HTTP server and its API tokens."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from keel.cli.common import EXIT_USAGE, fail, make_cwd_importable, open_store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from keel.server.guard import GateConfig
    from keel.store.metadata import MetadataStore

DEFAULT_PORT = 8765


def build_app(
    store: MetadataStore, refs: list[str], dispatch: str, gate: GateConfig | None = None
) -> FastAPI:
    """The application with its workflow registry (from --workflows and keel.toml)."""
    from keel.server.app import create_app
    from keel.server.workflows import WorkflowRegistry, config_refs

    make_cwd_importable()
    registry = WorkflowRegistry()
    for ref in [*config_refs(Path.cwd()), *refs]:
        found = registry.load(ref)
        typer.echo(f"workflows from {ref}: {', '.join(wf.name for wf in found)}", err=True)
    app = create_app(store, gate)
    app.state.workflows = registry
    app.state.dispatch = dispatch
    return app


def _check_can_listen(host: str, port: int) -> None:
    """Fail with one clear line before uvicorn would (its own failure is a log line
    and exit code 3): the port is taken, or the address is not this machine's."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as probe:
            # As uvicorn does: a port left in TIME_WAIT by a previous server is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        fail(
            f"cannot listen on {host}:{port}: {reason}",
            hint="Pick another port with --port"
            if exc.errno == errno.EADDRINUSE
            else "Check --host: it must be an address of this machine (e.g. 127.0.0.1)",
            code=EXIT_USAGE,
        )


def _serve(app: FastAPI, host: str, port: int, ready: threading.Event | None = None) -> None:
    import uvicorn

    _check_can_listen(host, port)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=os.environ.get("KEEL_SERVER_LOG_LEVEL", "warning"),
        timeout_graceful_shutdown=3,
    )
    server = uvicorn.Server(config)
    if ready is not None:

        def wait() -> None:
            while not server.started and not server.should_exit:
                threading.Event().wait(0.05)
            if server.started:
                ready.set()

        threading.Thread(target=wait, daemon=True).start()
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when binding fails after all (a race)
        pass
    if not server.started:
        fail(
            f"could not listen on {host}:{port}",
            hint="Is the port taken? Pick another with --port",
        )


def server(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (loopback unless tokens exist)")
    ] = "127.0.0.1",
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Another host name clients may call this server by (repeatable; also "
            "KEEL_SERVER_ALLOWED_HOSTS); others get 400",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Serve anyone who can reach --host as admin while no API token exists "
            "(unsafe beyond loopback)",
        ),
    ] = False,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = DEFAULT_PORT,
    workflows: Annotated[
        list[str] | None,
        typer.Option(
            "--workflows",
            "-w",
            metavar="REF",
            help="Workflows the API can start: file.py:name, module:name, or a whole "
            "file or module (repeatable; also [server] workflows in keel.toml)",
        ),
    ] = None,
    dispatch: Annotated[
        str,
        typer.Option(
            "--dispatch",
            help="Where runs started over HTTP execute: 'server' (threads of this "
            "process) or 'queue' (keel worker processes)",
        ),
    ] = "server",
    takeover: Annotated[
        bool | None,
        typer.Option(
            "--takeover/--no-takeover",
            help="Continue runs whose owner died (its lease ran out): a killed `keel run`, "
            "server or worker (default: on with --dispatch server, off with queue, "
            "where workers take them over)",
        ),
    ] = None,
) -> None:
    """Serve the REST API (/api/v1), the web UI and the MLflow-compatible API."""
    from keel.server.auth import token_ever_created
    from keel.server.guard import GateConfig, is_loopback

    if dispatch not in ("server", "queue"):
        fail(f"--dispatch must be 'server' or 'queue', got {dispatch!r}", code=EXIT_USAGE)
    store = open_store(ctx)
    gate = GateConfig.from_env(host, tuple(allowed_hosts or ()), insecure_no_auth)
    if not is_loopback(host) and not token_ever_created(store):
        if not insecure_no_auth:
            fail(
                f"refusing to listen on {host}: no API token exists, so anyone who can reach "
                "this address could read, start and delete runs",
                hint="Create one first (keel token create NAME --role admin), listen on "
                "127.0.0.1, or pass --insecure-no-auth if the network is yours alone",
                code=EXIT_USAGE,
            )
        typer.echo(
            f"WARNING: --insecure-no-auth: anyone who can reach {host}:{port} is admin of "
            "this store (reads, starts, deletes) until an API token is created",
            err=True,
        )
    app = build_app(store, list(workflows or []), dispatch, gate)
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"keel server on http://{shown}:{port}/ (API: /api/v1, stop with Ctrl-C)")
    ready = threading.Event()
    if takeover if takeover is not None else dispatch == "server":
        from keel.server.workflows import runner_of

        def take_over() -> None:
            # Only a server that is up takes runs over (not one that fails to listen).
            if ready.wait():
                runner_of(app.state).start_takeover()
                typer.echo("taking over runs whose owner is lost (--no-takeover: leave them)")

        threading.Thread(target=take_over, daemon=True).start()
    _serve(app, host, port, ready)


def _running(url: str) -> bool:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/v1/health", timeout=1) as reply:
            return bool(json.loads(reply.read()).get("status") == "ok")
    except Exception:
        return False


def ui(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = DEFAULT_PORT,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="Open the browser")] = True,
    workflows: Annotated[
        list[str] | None,
        typer.Option("--workflows", "-w", metavar="REF", help="As for keel server"),
    ] = None,
) -> None:
    """Open the web UI of the local store, starting a server on 127.0.0.1 if none runs."""
    import webbrowser

    url = f"http://127.0.0.1:{port}"
    if _running(url):
        typer.echo(f"keel UI: {url}/")
        if open_browser:
            webbrowser.open(f"{url}/")
        return
    app = build_app(open_store(ctx), list(workflows or []), "server")
    typer.echo(f"keel UI: {url}/ (server started here; stop with Ctrl-C)")
    ready = threading.Event()
    if open_browser:

        def show() -> None:
            if ready.wait(30):
                webbrowser.open(f"{url}/")

        threading.Thread(target=show, daemon=True).start()
    _serve(app, "127.0.0.1", port, ready)


# -- tokens ------------------------------------------------------------------------------


def token_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A name for whoever uses the token")],
    role: Annotated[
        str, typer.Option("--role", help="viewer (read), operator (start/stop runs), admin")
    ] = "viewer",
) -> None:
    """Create an API token; it is printed once (only its hash is kept)."""
    from keel.server.auth import create_token

    token = create_token(open_store(ctx), name, role)
    typer.echo(token)
    typer.echo(
        f"token {name!r} ({role}) created; it is shown only now. "
        "Send it as `Authorization: Bearer <token>`.",
        err=True,
    )


def token_ls(ctx: typer.Context) -> None:
    """List API tokens (names, roles, last use; never the tokens)."""
    from datetime import UTC, datetime

    from keel.server.auth import list_tokens

    found = list_tokens(open_store(ctx))
    if not found:
        typer.echo("no API tokens: the server accepts local requests only", err=True)
        return

    def when(ts: object) -> str:
        if not isinstance(ts, int | float):
            return "-"
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")

    typer.echo(f"{'NAME':<24} {'ROLE':<9} {'CREATED (UTC)':<20} {'LAST USED':<20} STATE")
    for t in found:
        state = "revoked" if t["revoked"] else "active"
        typer.echo(
            f"{t['name']!s:<24} {t['role']!s:<9} {when(t['created_at']):<20} "
            f"{when(t['last_used_at']):<20} {state}"
        )


def token_revoke(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The token's name")]
) -> None:
    """Revoke an API token: it stops working at once."""
    from keel.server.auth import revoke_token

    if not revoke_token(open_store(ctx), name):
        fail(f"no token named {name!r}", hint="See them with `keel token ls`", code=EXIT_USAGE)
    typer.echo(f"token {name!r} revoked")
