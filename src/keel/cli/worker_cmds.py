"""`keel worker`, `keel signal`, `keel pools set/ls`, `keel workers ls`, and what
`keel run --submit` prints."""

from __future__ import annotations

import json
import signal as signals
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import EXIT_OK, EXIT_USAGE, fail, make_cwd_importable, open_store

if TYPE_CHECKING:
    from keel.engine.api import RunHandle
    from keel.sdk.definitions import Workflow
    from keel.store.metadata import MetadataStore

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:")
# A worker whose last heartbeat is older than this is shown as gone.
STALE_AFTER_SECONDS = 60.0


def check_name(name: str, what: str) -> str:
    """A queue or pool name as tasks may use it (the same rules as `@keel.task`)."""
    if not name or len(name) > 100 or set(name) - _NAME_CHARS:
        fail(
            f"bad {what} name {name!r}",
            hint="Use letters, digits and _ - . : (at most 100 characters)",
            code=EXIT_USAGE,
        )
    return name


def _load(ref: str) -> None:
    """Import user code into the worker: `pkg.module`, `path/to/file.py` or a `REF:wf`."""
    import importlib

    from keel.errors import DefinitionError
    from keel.sdk.loader import load_workflow, module_from_file

    make_cwd_importable()
    if ":" in ref:
        load_workflow(ref)
        return
    try:
        if ref.endswith(".py") or "/" in ref:
            from pathlib import Path

            path = Path(ref).expanduser()
            if not path.is_file():
                fail(f"--load {ref}: no such file", code=EXIT_USAGE)
            module_from_file(path)
        else:
            importlib.import_module(ref)
    except (DefinitionError, typer.Exit):
        raise
    except ModuleNotFoundError as exc:
        fail(f"--load {ref}: cannot import it: {exc}", code=EXIT_USAGE)
    except Exception as exc:
        from keel.cli.common import describe_exception

        fail(f"--load {ref}: importing it failed: {describe_exception(exc)}", code=EXIT_USAGE)


def worker(
    ctx: typer.Context,
    queue: Annotated[
        list[str] | None,
        typer.Option(
            "--queue", "-q", metavar="QUEUE", help="A queue to serve (repeatable; default: default)"
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Items (runs or steps) worked on at once")
    ] = 4,
    lease: Annotated[
        float | None,
        typer.Option(
            "--lease",
            min=1.0,
            metavar="SECONDS",
            help="How long a claim stays valid without renewal; another worker takes over "
            "a dead worker's claims after this long (default: KEEL_LEASE_SECONDS, else 30)",
        ),
    ] = None,
    grace: Annotated[
        float,
        typer.Option(
            "--grace",
            min=0.0,
            metavar="SECONDS",
            help="On SIGTERM / Ctrl-C, how long running items may finish before they are "
            "handed back to other workers",
        ),
    ] = 30.0,
    no_scheduler: Annotated[
        bool,
        typer.Option(
            "--no-scheduler", help="Only execute queued work: do not also start scheduled runs"
        ),
    ] = False,
    load: Annotated[
        list[str] | None,
        typer.Option(
            "--load",
            metavar="REF",
            help="Import user code first: pkg.module, path/to/file.py or file.py:workflow "
            "(repeatable)",
        ),
    ] = None,
) -> None:
    """Take queued runs and steps from the metadata store and execute them.

    Any number of workers (on any hosts that reach a PostgreSQL store, or on this host
    with SQLite) share the queues. SIGTERM or Ctrl-C stops the worker cleanly: running
    items get --grace seconds, the rest are handed back to other workers.
    """
    import logging

    from keel.engine.api import LEASE_SECONDS
    from keel.scheduler.worker import Worker

    queues = [check_name(q, "queue") for q in (queue or ["default"])]
    queues = list(dict.fromkeys(queues))
    for ref in load or []:
        _load(ref)
    make_cwd_importable()
    if not no_scheduler:
        # Importing it makes the worker run a scheduler pass on every turn of its loop.
        import keel.scheduler.service  # noqa: F401
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    store = open_store(ctx)
    w = Worker(
        queues=queues,
        concurrency=concurrency,
        store=store,
        lease_seconds=lease or LEASE_SECONDS,
        grace_seconds=grace,
    )
    typer.echo(
        f"worker {w.id} serving queues: {', '.join(queues)} "
        f"(concurrency {w.concurrency}, lease {w.lease_seconds:g}s)"
    )
    typer.echo("stop it with Ctrl-C or SIGTERM: its claims are handed back to other workers")

    def on_interrupt(*_: Any) -> None:
        typer.echo("stopping: finishing or handing back the items in hand...", err=True)
        # A second Ctrl-C interrupts for real.
        signals.signal(signals.SIGINT, signals.default_int_handler)
        w.stop()

    previous = signals.signal(signals.SIGINT, on_interrupt)
    try:
        w.run()
    finally:
        signals.signal(signals.SIGINT, previous)
    typer.echo(f"worker {w.id} stopped after {w.completed} items")
    raise typer.Exit(EXIT_OK)


def signal(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (an unambiguous id prefix is enough)")],
    name: Annotated[str, typer.Argument(help="The signal's name, as in keel.wait_for_signal")],
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", metavar="JSON", help="The payload, as JSON (default: null)"),
    ] = None,
) -> None:
    """Send a signal to a run: `keel.wait_for_signal(NAME)` in the run returns its payload.

    Signals sent before the run waits are kept, and read one per wait in order.
    """
    from keel.engine.api import signal as send_signal

    payload: Any = None
    if data is not None:
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            fail(
                f"--data is not valid JSON: {exc.msg} (at character {exc.pos})",
                hint="Quote the JSON for the shell: --data '{\"ok\": true}' or --data '\"yes\"'",
                code=EXIT_USAGE,
            )
    if not name or len(name) > 200:
        fail("a signal name must be 1 to 200 characters", code=EXIT_USAGE)
    store = open_store(ctx)
    rid = store.resolve_run_id(run_id)
    send_signal(rid, name, payload, store=store)
    row = store.get_run(rid)
    status = row.status if row is not None else "?"
    typer.echo(f"sent signal {name!r} to run {rid} ({status})")


def pools_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The pool, as named by @keel.task(pool=...)")],
    slots: Annotated[int, typer.Argument(min=0, help="Steps of the pool running at once, at most")],
) -> None:
    """Create a pool or change its size: it caps how many of its steps run at once
    across all workers."""
    from keel.store import queue

    check_name(name, "pool")
    store = open_store(ctx)
    before = queue.list_pools(store).get(name)
    queue.set_pool(store, name, slots)
    change = "created" if before is None else f"changed from {before} to"
    typer.echo(f"pool {name} {change} {slots} slot{'s' if slots != 1 else ''}")


def _pool_usage(store: MetadataStore) -> dict[str, int]:
    """Claimed, unexpired items per pool: steps of the pool running now."""
    import sqlalchemy as sa

    from keel.store.schema import queue_items

    now = time.time()
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(queue_items.c.pool, sa.func.count())
            .where(
                queue_items.c.pool.is_not(None),
                queue_items.c.status == "claimed",
                queue_items.c.lease_until >= now,
            )
            .group_by(queue_items.c.pool)
        ).all()
    return {str(pool): int(count) for pool, count in rows}


def pools_ls(ctx: typer.Context) -> None:
    """List the pools: slots and steps of each running now."""
    from rich.table import Table

    from keel.cli.display import console
    from keel.store import queue

    store = open_store(ctx)
    known = queue.list_pools(store)
    out = console()
    if not known:
        out.print("no pools; create one with `keel pools set NAME SLOTS`", markup=False)
        return
    usage = _pool_usage(store)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("POOL", "SLOTS", "RUNNING"):
        table.add_column(column, no_wrap=True)
    for name in sorted(known):
        table.add_row(name, str(known[name]), str(usage.get(name, 0)))
    out.print(table)


def workers_ls(
    ctx: typer.Context,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also stopped workers and silent ones")
    ] = False,
) -> None:
    """List live workers: their queues and how long ago they last sent a heartbeat."""
    import sqlalchemy as sa
    from rich.table import Table

    from keel.cli.display import console, duration
    from keel.store import queue
    from keel.store.schema import workers

    store = open_store(ctx)
    if show_all:
        with store.engine.connect() as conn:
            rows = list(conn.execute(sa.select(workers).order_by(workers.c.started_at.desc())))
    else:
        rows = queue.live_workers(store, stale_after=STALE_AFTER_SECONDS)
    out = console()
    if not rows:
        out.print(
            "no live workers; start one with `keel worker --queue QUEUE`"
            if not show_all
            else "no worker ever registered with this store",
            markup=False,
        )
        return
    now = time.time()
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("WORKER", "QUEUES", "HEARTBEAT", "UP", "STATUS"):
        table.add_column(column, no_wrap=column != "QUEUES")
    for row in rows:
        age = now - row.heartbeat_at
        gone = row.status == "running" and age > STALE_AFTER_SECONDS
        table.add_row(
            row.id,
            ", ".join(json.loads(row.queues)),
            f"{duration(max(0.0, age))} ago",
            duration(max(0.0, now - row.started_at)),
            "silent" if gone else row.status,
        )
    out.print(table)


def served_queues(store: MetadataStore) -> set[str]:
    """The queues some live worker serves now."""
    from keel.store import queue

    served: set[str] = set()
    for row in queue.live_workers(store, stale_after=STALE_AFTER_SECONDS):
        served.update(json.loads(row.queues))
    return served


def report_submitted(store: MetadataStore, handle: RunHandle, queue_name: str) -> None:
    """What `keel run --submit` prints: the run, how to watch it, and a warning when no
    live worker serves its queue."""
    typer.echo(f"queued run {handle.id} of {handle.workflow} on queue {queue_name!r}")
    typer.echo(f"watch it with: keel runs show {handle.id}    (logs: keel logs {handle.id})")
    if queue_name not in served_queues(store):
        typer.secho("warning: ", fg=typer.colors.YELLOW, bold=True, err=True, nl=False)
        typer.echo(
            f"no live worker serves queue {queue_name!r}; the run waits until one does",
            err=True,
        )
        typer.secho(
            f"hint: start one with `keel worker --queue {queue_name}`",
            fg=typer.colors.YELLOW,
            err=True,
        )


def submit_run(
    store: MetadataStore,
    wf: Workflow[Any, Any],
    params: dict[str, Any],
    submit: bool,
    queue: str | None,
    priority: int | None,
    executor: object,
    max_concurrency: int | None,
) -> None:
    """`keel run --submit`: queue the run for the workers instead of running it here."""
    from keel.engine.api import submit as submit_to_queue

    if not submit:
        fail(
            "--queue and --priority apply to queued runs",
            hint="Add --submit to queue the run for `keel worker` processes",
            code=EXIT_USAGE,
        )
    if executor is not None or max_concurrency is not None:
        fail(
            "--executor and --max-concurrency apply to runs executed here, not to --submit",
            hint="Set them on the workflow (@keel.workflow(executor=..., max_concurrency=...))",
            code=EXIT_USAGE,
        )
    queue_name = check_name(queue, "queue") if queue is not None else wf.queue
    handle = submit_to_queue(wf, queue_name=queue_name, priority=priority, **params)
    report_submitted(store, handle, queue_name)
