"""`keel serve` (a model or a workflow as an HTTP endpoint) and `keel deployments ls`.

Exit codes of `keel serve`: 0 after a graceful shutdown (SIGTERM, SIGINT/Ctrl-C);
2 bad input: an unknown model, version or alias, a malformed URI or option, a port
that is taken or an address that is not this machine's, an address beyond loopback
while no API token exists (without --insecure-no-auth); 1 the model exists but
cannot be loaded here (e.g. its flavor's library is missing), or another failure.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from keel.cli.common import EXIT_FAILED, EXIT_USAGE, fail, make_cwd_importable, open_store


def serve(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a workflow "
            "(file.py:name, module:name)"
        ),
    ],
    host: Annotated[
        str,
        typer.Option("--host", help="Address to listen on (loopback unless an API token exists)"),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8080,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes serving on the one port")
    ] = 1,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", min=1, help="Rows per predict call")
    ] = 32,
    batch_wait_ms: Annotated[
        float,
        typer.Option(
            "--batch-wait-ms", min=0, help="How long a batch waits for more requests (ms)"
        ),
    ] = 0.0,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=1, help="Larger request bodies get 413")
    ] = 10 * 1024 * 1024,
    request_timeout: Annotated[
        float,
        typer.Option("--request-timeout", min=0.001, help="Seconds per request, else 504"),
    ] = 30.0,
    graceful_timeout: Annotated[
        float,
        typer.Option(
            "--graceful-timeout", min=0, help="Seconds in-flight requests get at shutdown"
        ),
    ] = 10.0,
    ephemeral: Annotated[
        bool,
        typer.Option("--ephemeral", help="A workflow's steps run in memory, unrecorded"),
    ] = False,
    on: Annotated[
        str, typer.Option("--on", help="local (this machine) or ray (a Ray Serve application)")
    ] = "local",
    replicas: Annotated[
        int | None, typer.Option("--replicas", min=1, help="--on ray: replicas to run")
    ] = None,
    min_replicas: Annotated[
        int | None,
        typer.Option("--min-replicas", min=0, help="--on ray: autoscale from this many"),
    ] = None,
    max_replicas: Annotated[
        int | None,
        typer.Option("--max-replicas", min=1, help="--on ray: autoscale up to this many"),
    ] = None,
    autoscaling: Annotated[
        str | None,
        typer.Option(
            "--autoscaling", help="--on ray: Ray Serve's autoscaling_config as a JSON object"
        ),
    ] = None,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            metavar="NAME",
            help="Another host name clients may call this endpoint by (repeatable; also "
            "KEEL_SERVER_ALLOWED_HOSTS); others get 400",
        ),
    ] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Serve anyone who can reach --host while no API token exists "
            "(unsafe beyond loopback)",
        ),
    ] = False,
    log_requests: Annotated[
        bool,
        typer.Option(
            "--log-requests",
            help="Write sampled requests (inputs, predictions, latency) to the inference log",
        ),
    ] = False,
    log_sample_rate: Annotated[
        float,
        typer.Option(
            "--log-sample-rate", min=0.0, max=1.0, help="The share of requests logged (0 to 1)"
        ),
    ] = 1.0,
) -> None:
    """Serve a registered model (MLflow's scoring protocol) or a workflow over HTTP."""
    from keel.errors import ConfigError, ModelRegistryError, ServingError
    from keel.serving.runner import is_model_target
    from keel.serving.runner import serve as run_server

    open_store(ctx)  # a bad --db-url fails here, before anything listens
    if not is_model_target(target):
        make_cwd_importable()

    def announce(url: str) -> None:
        typer.echo(f"keel serve: {target} on {url}/ (stop with Ctrl-C)", err=True)

    try:
        run_server(
            target,
            host=host,
            port=port,
            workers=workers,
            max_batch_size=max_batch_size,
            batch_wait_ms=batch_wait_ms,
            max_body_bytes=max_body_bytes,
            request_timeout=request_timeout,
            graceful_timeout=graceful_timeout,
            ephemeral=ephemeral,
            log_requests=log_requests,
            log_sample_rate=log_sample_rate,
            announce=announce,
            on=on,
            replicas=replicas,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            autoscaling=autoscaling,
            allowed_hosts=tuple(allowed_hosts or ()),
            insecure_no_auth=insecure_no_auth,
        )
    except (ServingError, ModelRegistryError) as exc:
        fail(exc.message, hint=exc.hint, code=EXIT_USAGE)
    except ConfigError as exc:  # --on ray: the cluster cannot be reached or started
        fail(exc.message, hint=exc.hint, code=EXIT_FAILED)
    except ImportError as exc:
        fail(
            f"cannot load {target}: {type(exc).__name__}: {exc}",
            hint="Install the library the model (or workflow) needs in this environment",
            code=EXIT_FAILED,
        )
    typer.echo("keel serve: stopped", err=True)


def deployments_ls(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also servers that have stopped")
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Only this registered model")
    ] = None,
) -> None:
    """List running servers (`keel serve`): what they serve, where, since when."""
    from rich.table import Table

    from keel.cli.display import console, duration
    from keel.store import deployments

    rows = deployments.list_deployments(open_store(ctx), model=model, include_stopped=show_all)
    out = console()
    if not rows:
        out.print(
            "no deployments; start one with `keel serve models:/NAME@ALIAS`"
            if not show_all
            else "no server ever recorded itself in this store",
            markup=False,
        )
        return
    now = time.time()
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns = ("ID", "TARGET", "VERSION", "URL", "WORKERS", "PID", "UP", "HEARTBEAT", "STATE")
    for column in (*columns, "REQ/S", "P50", "P95", "ERRORS"):
        table.add_column(column, no_wrap=column != "TARGET")
    for row in rows:
        end = row.stopped_at if row.stopped_at is not None else now
        state = row.state + (" (reload failed)" if row.last_error else "")
        table.add_row(
            row.id,
            row.target,
            "-" if row.version is None else str(row.version),
            f"http://{row.host}:{row.port}/",
            str(row.workers),
            f"{row.pid}@{row.machine}",
            duration(max(0.0, end - row.started_at)),
            f"{duration(max(0.0, now - row.heartbeat_at))} ago",
            state,
            *traffic(row),
        )
    out.print(table)


def traffic(row: Any) -> tuple[str, str, str, str]:
    """Rate and latency over the last minute, errors of all requests ("-" unknown)."""
    rate = "-" if row.rate is None else f"{row.rate:.2f}"
    p50 = "-" if row.p50_ms is None else f"{row.p50_ms:.1f}ms"
    p95 = "-" if row.p95_ms is None else f"{row.p95_ms:.1f}ms"
    errors = "-" if row.requests is None else f"{row.errors or 0}/{row.requests}"
    return rate, p50, p95, errors
