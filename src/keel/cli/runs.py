"""`keel runs ls` and `keel runs show`."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated

import typer

from keel.cli.common import EXIT_USAGE, fail, open_client

if TYPE_CHECKING:
    from rich.console import Console

    from keel.client import Run
    from keel.store.metadata import MetadataStore
    from keel.store.queue import LostOwner

RUN_STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TRACEBACKS_SHOWN = 3


def _statuses(text: str | None) -> list[str] | None:
    if not text:
        return None
    wanted = [s.strip().upper() for s in text.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in RUN_STATUSES]
    if unknown:
        fail(
            f"unknown run status {', '.join(unknown)}",
            hint=f"Use one or more (comma-separated) of {', '.join(RUN_STATUSES)}",
            code=EXIT_USAGE,
        )
    return wanted


def lost_owners(store: MetadataStore, found: list[Run]) -> dict[str, LostOwner]:
    """The unfinished runs among `found` whose owner stopped renewing its lease (a
    child run, through its root), by run id."""
    from keel.store import queue

    roots = {r.id: r.id.split(".")[0] for r in found if r.status in ("RUNNING", "PENDING")}
    lost = queue.lost_owners(store, list(roots.values()))
    return {rid: lost[root] for rid, root in roots.items() if root in lost}


def lost_line(run_id: str, lost: LostOwner) -> str:
    """What to say of a run whose owner is lost: since when, and what continues it."""
    from datetime import UTC, datetime

    from keel.cli.display import when

    root = run_id.split(".")[0]
    return (
        f"owner lost since {when(datetime.fromtimestamp(lost.since, UTC))} "
        f"({lost.owner} stopped renewing its lease); resume it with: keel resume {root}"
    )


def ls(
    ctx: typer.Context,
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Only runs of this workflow")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", "-s", help="Only runs in this status (or several: FAILED,CANCELLED)"
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many runs")] = 20,
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Every matching run (no limit)")
    ] = False,
    children: Annotated[
        bool, typer.Option("--children", help="Include child runs (workflows called by workflows)")
    ] = False,
) -> None:
    """List runs, newest first."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli import queries
    from keel.cli.display import console, duration, status_text, when
    from keel.cli.outcome import counts_line

    wanted = _statuses(status)
    client = open_client(ctx)
    runs = client.runs(
        workflow=workflow,
        status=wanted,
        limit=None if show_all else limit,
        include_children=children,
    )
    out = console()
    if not runs:
        filters = " matching the filters" if workflow or status else ""
        out.print(f"no runs{filters} in the store at {client.store.url}", markup=False)
        return
    counts = queries.step_counts(client.store, [r.id for r in runs])
    lost = lost_owners(client.store, runs)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "WORKFLOW", "STATUS", "STARTED", "DURATION", "STEPS"):
        table.add_column(name, no_wrap=name in ("ID", "STATUS", "STARTED"))
    now = time.time()
    for run in runs:
        took = run.duration
        if took is None and run.started_at is not None and run.status == "RUNNING":
            took = now - run.started_at.timestamp()
        table.add_row(
            Text(run.id),
            Text(run.workflow),
            status_text(run.status).append(", owner lost" if run.id in lost else "", "bold red"),
            Text(when(run.started_at)),
            Text(duration(took)),
            counts_line(counts.get(run.id, {})),
        )
    out.print(table)
    for run in runs:
        if run.id in lost:
            out.print(Text(f"{run.id}: {lost_line(run.id, lost[run.id])}", style="red"))
    if not show_all and len(runs) == limit:
        err = console(stderr=True)
        err.print(f"(the newest {limit}; --limit N or --all for more)", style="dim", markup=False)


def _header(out: Console, run: Run, lost: LostOwner | None = None) -> None:
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import duration, status_text, when

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("run", Text(run.id))
    grid.add_row("workflow", Text(run.workflow))
    grid.add_row("status", status_text(run.status))
    if lost is not None:
        text = lost_line(run.id, lost).removeprefix("owner ")
        grid.add_row("owner", Text(text, style="bold red"))
    grid.add_row("params", Text(json.dumps(run.params, sort_keys=True)))
    grid.add_row("created", Text(when(run.created_at)))
    grid.add_row("started", Text(when(run.started_at)))
    grid.add_row("ended", Text(when(run.ended_at)))
    if run.duration is None and run.status == "RUNNING" and run.started_at is not None:
        grid.add_row(
            "duration", Text(f"running for {duration(time.time() - run.started_at.timestamp())}")
        )
    else:
        grid.add_row("duration", Text(duration(run.duration)))
    if run.retry_of:
        grid.add_row("retry of", Text(run.retry_of))
    if run.parent_id:
        grid.add_row("parent", Text(run.parent_id))
    if run.entrypoint:
        grid.add_row("code", Text(run.entrypoint))
    if run.error_type or run.error_message:
        grid.add_row("error", Text(f"{run.error_type}: {run.error_message}", style="red"))
    out.print(grid)


def show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (an unambiguous id prefix is enough)")],
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="List every step, even in very large runs")
    ] = False,
) -> None:
    """Show a run: its parameters and times, then its steps as a tree."""
    from rich.text import Text
    from rich.tree import Tree

    from keel.cli import queries
    from keel.cli.display import console, user_traceback
    from keel.cli.outcome import counts_line
    from keel.cli.tree import TreeOptions, add_steps

    client = open_client(ctx)
    run = client.run(run_id)
    out = console()
    _header(out, run, lost_owners(client.store, [run]).get(run.id))
    counts = queries.step_counts(client.store, [run.id])[run.id]
    tree = Tree(Text("steps: ", style="bold").append_text(counts_line(counts)))
    opts = TreeOptions(show_all=show_all)
    add_steps(client, tree, run.id, run.steps, opts)
    out.print()
    out.print(tree)
    shown_step_traceback = False
    for step in opts.failed[:TRACEBACKS_SHOWN]:
        last = next((a for a in reversed(step.attempts) if a.traceback), None)
        trimmed = user_traceback(last.traceback or "") if last is not None else ""
        if last is None or not trimmed:
            continue
        out.print()
        out.print(Text(f"traceback of step {step.key} (attempt {last.number}):", style="bold red"))
        out.print(Text(trimmed))
        shown_step_traceback = True
    if len(opts.failed) > TRACEBACKS_SHOWN:
        more = len(opts.failed) - TRACEBACKS_SHOWN
        out.print(Text(f"({more} more failed steps: keel logs {run.id} STEP)", style="dim"))
    if run.traceback and user_traceback(run.traceback) and not shown_step_traceback:
        out.print()
        out.print(Text("traceback of the run:", style="bold red"))
        out.print(Text(user_traceback(run.traceback)))
