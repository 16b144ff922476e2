"""`keel schedules ...`, `keel backfill`, `keel triggers ...` and `keel scheduler`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import EXIT_OK, EXIT_USAGE, fail, make_cwd_importable, open_store

if TYPE_CHECKING:
    from keel.sdk.definitions import Workflow


class Catchup(StrEnum):
    none = "none"
    latest = "latest"
    all = "all"


class Overlap(StrEnum):
    skip = "skip"
    queue = "queue"
    cancel_previous = "cancel_previous"


class RunStatusChoice(StrEnum):
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


WF_HELP = "The workflow: path/to/file.py:name or package.module:name"
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param", "-p", metavar="NAME=VALUE", help="A parameter of each run (repeatable)"
    ),
]
CronOpt = Annotated[
    str | None,
    typer.Option(
        "--cron", metavar="EXPR", help="Five-field cron expression, e.g. '0 3 * * *' or @daily"
    ),
]
EveryOpt = Annotated[
    str | None,
    typer.Option("--every", metavar="INTERVAL", help="A fixed interval: 30s, 15m, 1h30m, 1d"),
]
TzOpt = Annotated[
    str | None,
    typer.Option(
        "--tz", "--timezone", metavar="ZONE", help="Time zone of the cron expression (default UTC)"
    ),
]


@contextmanager
def _bad_input() -> Iterator[None]:
    """Bad definitions and unknown names are bad input (exit 2)."""
    from keel.errors import DefinitionError, ParameterError

    try:
        yield
    except (DefinitionError, ParameterError) as exc:
        fail(exc.message, hint=exc.hint, code=EXIT_USAGE)


def _workflow(ref: str) -> Workflow[Any, Any]:
    from keel.cli.running import load_user_workflow

    return load_user_workflow(ref)


def _params(wf: Workflow[Any, Any], pairs: list[str] | None) -> dict[str, Any]:
    """`--param k=v` values: read as JSON unless the parameter is a str (as `keel run`)."""
    from keel.cli.running import parse_params
    from keel.sdk.params import parse_cli_value

    raw = parse_params(pairs or [])
    labels = wf.validator.labels
    return {k: v if labels.get(k) == "str" else parse_cli_value(v) for k, v in raw.items()}


def _local(moment: Any) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


# -- keel schedules -------------------------------------------------------------------------
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The schedule's name (letters, digits, _ - .)")],
    ref: Annotated[str, typer.Argument(metavar="WF_REF", help=WF_HELP)],
    cron: CronOpt = None,
    every: EveryOpt = None,
    tz: TzOpt = None,
    param: ParamOpt = None,
    catchup: Annotated[
        Catchup,
        typer.Option(help="Ticks missed while no scheduler ran: none, the latest, or all"),
    ] = Catchup.latest,
    overlap: Annotated[
        Overlap,
        typer.Option(
            help="A tick while runs of the schedule are active: skip it, queue it, "
            "or cancel the active run"
        ),
    ] = Overlap.queue,
    max_active_runs: Annotated[
        int | None,
        typer.Option("--max-active-runs", min=1, metavar="N", help="Active runs at most"),
    ] = None,
    queue: Annotated[
        str | None, typer.Option(metavar="QUEUE", help="Queue of its runs (default: workflow's)")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Priority of its runs in the queue")] = None,
    start: Annotated[
        str | None, typer.Option(metavar="ISO", help="First possible tick (default: now)")
    ] = None,
    end: Annotated[str | None, typer.Option(metavar="ISO", help="Last possible tick")] = None,
    replace: Annotated[bool, typer.Option(help="Redefine the schedule if it exists")] = False,
) -> None:
    """Run a workflow on a schedule: --cron (in --tz) or --every. Workers (or `keel
    scheduler`) start its runs; each run gets its tick's logical date."""
    from keel.scheduler import schedules

    with _bad_input():
        wf = _workflow(ref)
        info = schedules.add(
            name,
            wf,
            cron=cron,
            every=every,
            timezone=tz or "UTC",
            params=_params(wf, param),
            catchup=str(catchup),
            overlap=str(overlap),
            max_active_runs=max_active_runs,
            queue=queue,
            priority=priority,
            start=start,
            end=end,
            replace=replace,
            store=open_store(ctx),
        )
    typer.echo(f"schedule {info.name}: {info.workflow} {info.cadence.describe()}")
    typer.echo(f"next tick: {_local(info.next_run)}")
    typer.echo("runs start while a `keel worker` (or `keel scheduler`) is running")


def ls(ctx: typer.Context) -> None:
    """List schedules: cadence, next tick, policies, state."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console
    from keel.scheduler import schedules

    found = schedules.ls(store=open_store(ctx))
    out = console()
    if not found:
        out.print("no schedules; add one with `keel schedules add`", markup=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "WORKFLOW", "WHEN", "NEXT TICK", "CATCHUP", "OVERLAP", "QUEUE", "STATE"):
        table.add_column(column, no_wrap=column not in ("WHEN",))
    for s in found:
        overlap = s.overlap + (f" (max {s.max_active_runs})" if s.max_active_runs else "")
        table.add_row(
            Text(s.name),
            Text(s.workflow),
            Text(s.cadence.describe()),
            Text(_local(s.next_run)),
            s.catchup,
            overlap,
            Text(s.queue),
            s.status,
        )
    out.print(table)


def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The schedule")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Recent ticks shown")] = 10,
) -> None:
    """A schedule's definition and its recent ticks with their runs."""
    from keel.scheduler import schedules

    store = open_store(ctx)
    with _bad_input():
        s = schedules.get(name, store=store)
    lines = [
        ("workflow", f"{s.workflow} ({s.entrypoint})"),
        ("when", s.cadence.describe()),
        ("params", json.dumps(s.params, sort_keys=True)),
        ("catchup", s.catchup),
        ("overlap", s.overlap + (f", max {s.max_active_runs} active" if s.max_active_runs else "")),
        ("queue", f"{s.queue} (priority {s.priority})"),
        ("state", s.status),
        ("next tick", _local(s.next_run)),
    ]
    for key, value in lines:
        typer.echo(f"{key:<10} {value}")
    history = schedules.tick_history(name, limit=limit, store=store)
    if history:
        typer.echo("recent ticks:")
    for at, run_id in history:
        status = "skipped (a run was still active)"
        if run_id is not None:
            row = store.get_run(run_id)
            status = f"run {run_id} {row.status if row is not None else '?'}"
        typer.echo(f"  {s.cadence.local_iso(at)}  {status}")


def pause(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The schedule")]) -> None:
    """Stop starting runs (ticks passed meanwhile count as missed on resume)."""
    from keel.scheduler import schedules

    with _bad_input():
        schedules.pause(name, store=open_store(ctx))
    typer.echo(f"schedule {name} paused")


def resume(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The schedule")]) -> None:
    """Start runs again; its catch-up policy decides about the ticks missed meanwhile."""
    from keel.scheduler import schedules

    with _bad_input():
        info = schedules.resume(name, store=open_store(ctx))
    next_tick = _local(info.next_run)
    typer.echo(f"schedule {name} resumed (catch-up: {info.catchup}); next tick: {next_tick}")


def rm(ctx: typer.Context, name: Annotated[str, typer.Argument(help="The schedule")]) -> None:
    """Delete a schedule (its runs and recorded ticks stay)."""
    from keel.scheduler import schedules

    with _bad_input():
        schedules.remove(name, store=open_store(ctx))
    typer.echo(f"schedule {name} removed")


def sync(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(help="Code declaring schedules: file.py, pkg.module, or one REF:workflow"),
    ],
) -> None:
    """Register the schedules declared with @keel.workflow(schedule=...) in some code."""
    from keel.scheduler import schedules

    make_cwd_importable()
    with _bad_input():
        done = schedules.sync(ref, store=open_store(ctx))
    if not done:
        fail(f"no schedule is declared in {ref}", hint="@keel.workflow(schedule='0 3 * * *')")
    for info in done:
        when = f"{info.cadence.describe()}, next tick {_local(info.next_run)}"
        typer.echo(f"schedule {info.name}: {info.workflow} {when}")


# -- keel backfill --------------------------------------------------------------------------
def backfill(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="WF_REF", help=WF_HELP + ", or a schedule's name")],
    start: Annotated[str, typer.Option(metavar="ISO", help="First logical date (included)")],
    end: Annotated[str, typer.Option(metavar="ISO", help="Last logical date (included)")],
    cron: CronOpt = None,
    every: EveryOpt = None,
    tz: TzOpt = None,
    param: ParamOpt = None,
    max_active_runs: Annotated[
        int, typer.Option("--max-active-runs", min=1, metavar="N", help="Runs at once, at most")
    ] = 2,
    queue: Annotated[str | None, typer.Option(metavar="QUEUE", help="Queue of its runs")] = None,
) -> None:
    """Queue one run per interval between --start and --end, at a lower priority than
    scheduled runs, at most --max-active-runs at once."""
    from keel.scheduler.backfill import backfill as make_backfill
    from keel.scheduler.schedules import get

    store = open_store(ctx)
    with _bad_input():
        if ":" in ref:
            wf = _workflow(ref)
            target: Any = wf
        else:
            from keel.engine.api import locate_workflow

            make_cwd_importable()
            info = get(ref, store=store)
            wf, target = locate_workflow(info.workflow, info.entrypoint), ref
        done = make_backfill(
            target,
            start,
            end,
            cron=cron,
            every=every,
            timezone=tz,
            params=_params(wf, param),
            max_active_runs=max_active_runs,
            queue=queue,
            store=store,
        )
    typer.echo(
        f"backfill {done.id}: {done.runs} run{'s' if done.runs != 1 else ''} of {done.workflow} "
        f"queued ({_local(done.first)} .. {_local(done.last)}), "
        f"at most {done.max_active_runs} at once, priority {done.priority}"
    )
    if done.already_done:
        typer.echo(f"{done.already_done} interval(s) already had a run and were left alone")


# -- keel triggers ---------------------------------------------------------------------------
def triggers_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The trigger's name (letters, digits, _ - .)")],
    ref: Annotated[str, typer.Argument(metavar="WF_REF", help=WF_HELP + " (what it starts)")],
    on_run: Annotated[
        str | None,
        typer.Option("--on-run", metavar="WORKFLOW", help="When a run of this workflow ends"),
    ] = None,
    status: Annotated[
        list[RunStatusChoice] | None,
        typer.Option(
            "--status",
            help="With --on-run: the end states that fire (repeatable; default succeeded)",
        ),
    ] = None,
    on_alias: Annotated[
        str | None,
        typer.Option("--on-alias", metavar="MODEL[@ALIAS]", help="When a model alias moves"),
    ] = None,
    webhook: Annotated[
        bool, typer.Option("--webhook", help="When POST /api/v1/triggers/NAME is called")
    ] = False,
    on_files: Annotated[
        str | None,
        typer.Option("--on-files", metavar="GLOB", help="For each new file (any fsspec URL)"),
    ] = None,
    poll: Annotated[
        float, typer.Option(min=0.0, metavar="SECONDS", help="With --on-files: listing interval")
    ] = 30.0,
    ignore_existing: Annotated[
        bool, typer.Option(help="With --on-files: not for the files already there")
    ] = False,
    param: ParamOpt = None,
) -> None:
    """Start a workflow when a run ends, a model alias moves, a webhook is called or a
    file arrives. The scheduler (in workers, or `keel scheduler`) watches."""
    from keel.scheduler import triggers

    with _bad_input():
        wf = _workflow(ref)
        info = triggers.add(
            name,
            wf,
            on_run=on_run,
            statuses=[s.value.upper() for s in status or [RunStatusChoice.succeeded]],
            on_alias=on_alias,
            webhook=webhook,
            on_files=on_files,
            poll_seconds=poll,
            ignore_existing=ignore_existing,
            params=_params(wf, param),
            store=open_store(ctx),
        )
    typer.echo(f"trigger {info.name}: start {info.workflow} {info.describe()}")
    if info.kind == "webhook":
        typer.echo(f"token: {info.config['token']}  (callers send it; keep it secret)")


def triggers_ls(ctx: typer.Context) -> None:
    """List triggers and how often each has fired."""
    import sqlalchemy as sa
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console
    from keel.scheduler import triggers
    from keel.store.schema import trigger_events

    store = open_store(ctx)
    found = triggers.ls(store=store)
    out = console()
    if not found:
        out.print("no triggers; add one with `keel triggers add`", markup=False)
        return
    with store.engine.connect() as conn:
        counts: dict[str, int] = dict(
            conn.execute(  # type: ignore[arg-type]
                sa.select(trigger_events.c.trigger, sa.func.count()).group_by(
                    trigger_events.c.trigger
                )
            ).all()
        )
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "STARTS", "WHEN", "FIRED"):
        table.add_column(column, no_wrap=column != "WHEN")
    for t in found:
        table.add_row(
            Text(t.name), Text(t.workflow), Text(t.describe()), str(counts.get(t.name, 0))
        )
    out.print(table)


def triggers_events(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this trigger's firings")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many")] = 20,
) -> None:
    """Recorded firings, newest first: what caused each and the run it started."""
    from keel.cli.display import when
    from keel.scheduler import triggers

    store = open_store(ctx)
    if name is not None:
        with _bad_input():
            triggers.get(name, store=store)
    found = triggers.events(name, limit=limit, store=store)
    if not found:
        typer.echo("no firings recorded")
    from datetime import datetime

    for e in found:
        fired = when(datetime.fromtimestamp(e.fired_at).astimezone())
        outcome = f"run {e.run_id}" if e.run_id else f"no run: {e.cause.get('error', '?')}"
        cause = json.dumps({k: v for k, v in e.cause.items() if k != "error"}, sort_keys=True)
        typer.echo(f"{fired}  {e.trigger}  {outcome}  cause {cause}")


def triggers_rm(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The trigger")]
) -> None:
    """Delete a trigger (its recorded firings stay)."""
    from keel.scheduler import triggers

    with _bad_input():
        triggers.remove(name, store=open_store(ctx))
    typer.echo(f"trigger {name} removed")


def triggers_fire(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The trigger")],
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", metavar="JSON", help="The payload: an object of parameters"),
    ] = None,
) -> None:
    """Fire a trigger now, as its webhook would: the payload's keys are run parameters."""
    from keel.scheduler.triggers import fire_trigger

    payload: Any = {}
    if data is not None:
        try:
            payload = json.loads(data)
        except json.JSONDecodeError as exc:
            fail(
                f"--data is not valid JSON: {exc.msg} (at character {exc.pos})",
                hint="Quote it for the shell: --data '{\"n\": 3}'",
                code=EXIT_USAGE,
            )
    make_cwd_importable()
    with _bad_input():
        handle = fire_trigger(name, payload, store=open_store(ctx))
    typer.echo(f"trigger {name} fired: queued run {handle.id} of {handle.workflow}")


# -- keel scheduler ------------------------------------------------------------------------
def scheduler(
    ctx: typer.Context,
    load: Annotated[
        list[str] | None,
        typer.Option(
            "--load",
            metavar="REF",
            help="Import code first and register the schedules it declares: file.py, "
            "pkg.module or file.py:workflow (repeatable)",
        ),
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit")] = False,
) -> None:
    """Start the runs of due schedule ticks and fired triggers, without executing any
    (workers do: `keel worker` also schedules, unless --no-scheduler). Several
    schedulers may run at once: each tick still starts one run."""
    import logging
    import signal as signals
    import threading

    from keel.scheduler import schedules
    from keel.scheduler.scheduler import Pass, Scheduler

    make_cwd_importable()
    store = open_store(ctx)
    with _bad_input():
        for ref in load or []:
            for info in schedules.sync(ref, store=store):
                typer.echo(f"schedule {info.name} registered ({info.cadence.describe()})")
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s"
    )
    sched = Scheduler(store)

    def report(result: Pass) -> None:
        for run_id in result.started:
            typer.echo(f"tick: queued run {run_id}")
        for run_id in result.fired:
            typer.echo(f"trigger: queued run {run_id}")
        for run_id in result.cancelled:
            typer.echo(f"cancel_previous: stopping run {run_id}")

    if once:
        report(sched.tick())
        raise typer.Exit(EXIT_OK)
    stop = threading.Event()
    previous = {
        sig: signals.signal(sig, lambda *_: stop.set()) for sig in (signals.SIGINT, signals.SIGTERM)
    }
    from keel.store.metadata import describe_url

    typer.echo(f"scheduler watching {describe_url(store.url)}: stop it with Ctrl-C or SIGTERM")
    try:
        sched.run(stop, on_pass=report)
    finally:
        for sig, handler in previous.items():
            signals.signal(sig, handler)
    typer.echo("scheduler stopped")
