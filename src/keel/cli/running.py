"""`keel run`, `resume`, `retry` and `cancel`.

The run executes on the main thread so that Ctrl-C reaches the engine, which
records the run as CANCELLED (resumable) and re-raises KeyboardInterrupt. SIGTERM
is turned into the same interrupt (`Terminated`) for the whole command.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    describe_exception,
    fail,
    make_cwd_importable,
    open_store,
)

if TYPE_CHECKING:
    from keel.engine.api import RunHandle
    from keel.engine.session import Session
    from keel.sdk.definitions import Workflow


class ExecutorName(StrEnum):
    threads = "threads"
    processes = "processes"
    ray = "ray"
    queue = "queue"


def parse_params(pairs: list[str]) -> dict[str, str]:
    raw: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(
                f"--param {pair!r} is not of the form name=value",
                hint="Write e.g. --param n=10 --param name=alice (values are read as JSON "
                "when they parse, e.g. --param sizes=[1,2])",
                code=EXIT_USAGE,
            )
        if key in raw:
            fail(f"parameter {key!r} is given twice", code=EXIT_USAGE)
        raw[key] = value
    return raw


def load_user_workflow(ref: str) -> Workflow[Any, Any]:
    """Load `ref`; an exception raised by the user's module becomes a one-line error."""
    from keel.errors import KeelError
    from keel.sdk.loader import load_workflow

    make_cwd_importable()
    try:
        return load_workflow(ref)
    except KeelError:
        raise
    except Exception as exc:
        fail(
            f"importing {ref.rpartition(':')[0]} failed: {describe_exception(exc)}",
            hint="Fix the module, or check it runs with `python path/to/file.py`",
            code=EXIT_USAGE,
        )


def _execute(
    session: Session,
    label: str,
    start: Callable[[], RunHandle],
    *,
    known_id: str | None = None,
    reused: bool = False,
) -> int:
    """Run `start` under the progress display; print the outcome; return the exit code."""
    from keel.cli.display import console as make_console
    from keel.cli.outcome import print_outcome
    from keel.cli.progress import RunMonitor
    from keel.engine.interrupts import sigterm_as_interrupt
    from keel.errors import Terminated

    out = make_console()
    monitor = RunMonitor(session, out, label=label)
    try:
        with sigterm_as_interrupt(), monitor:
            handle = start()
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        _interrupted(session, monitor.run_id or known_id, "SIGTERM" if terminated else "Ctrl-C")
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    replayed = session.progress.replayed
    return print_outcome(out, session.store, handle.id, replayed=replayed, reused=reused)


def _interrupted(session: Session, run_id: str | None, cause: str) -> None:
    """Say what an interrupt left behind, from the record, and how to continue."""
    from keel.cli.display import console as make_console

    err = make_console(stderr=True)
    if run_id is None:
        err.print(f"interrupted ({cause}) before the run started", markup=False)
        return
    row = session.store.get_run(run_id)
    status = row.status if row is not None else "unknown"
    if status == "CANCELLED":
        err.print(
            f"run {run_id} cancelled ({cause}): it stopped starting steps; every finished "
            "step is recorded, and the steps it stopped are recorded as CANCELLED",
            markup=False,
        )
    else:
        err.print(f"run {run_id} interrupted ({cause}); it is recorded as {status}", markup=False)
    if status != "SUCCEEDED":
        err.print(f"continue it with: keel resume {run_id}", style="yellow", markup=False)


def run(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(
            metavar="REF", help="The workflow: path/to/file.py:name or package.module:name"
        ),
    ],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", metavar="NAME=VALUE", help="A workflow parameter (repeatable)"
        ),
    ] = None,
    executor: Annotated[
        ExecutorName | None,
        typer.Option(help="Where steps run (default: the workflow's choice, else threads)"),
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="At most this many steps at once")
    ] = None,
    submit: Annotated[
        bool,
        typer.Option("--submit", help="Queue the run for `keel worker` processes and return"),
    ] = False,
    queue: Annotated[
        str | None,
        typer.Option(help="With --submit: the queue (default: the workflow's, else default)"),
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(help="With --submit: higher runs first (default: the workflow's priority)"),
    ] = None,
) -> None:
    """Run a workflow durably, showing progress, then a summary (or queue it: --submit)."""
    raw = parse_params(param or [])
    wf = load_user_workflow(ref)
    params = wf.validator.validate_cli(raw)
    store = open_store(ctx)
    if submit or queue is not None or priority is not None:
        from keel.cli.worker_cmds import submit_run

        submit_run(store, wf, params, submit, queue, priority, executor, max_concurrency)
        raise typer.Exit(EXIT_OK)
    from keel.engine.api import new_session, start_run

    session = new_session(
        store=store,
        executor=executor.value if executor else wf.executor,
        max_concurrency=max_concurrency,
    )
    code = _execute(
        session, wf.name, lambda: start_run(wf, params, session=session, validated=True)
    )
    raise typer.Exit(code)


def _session_for(ctx: typer.Context, run_id: str) -> tuple[Session, Any]:
    """A session on the executor the run was recorded with, and the run's row."""
    from keel.engine.api import new_session

    store = open_store(ctx)
    row = store.get_run(store.resolve_run_id(run_id))
    if row is None:  # deleted between the two reads
        fail(f"run {run_id} disappeared from the store", code=EXIT_USAGE)
    make_cwd_importable()
    return new_session(store=store, executor=row.executor), row


def resume(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (an unambiguous id prefix is enough)")],
    force: Annotated[
        bool, typer.Option("--force", help="Resume even if the run looks alive in another process")
    ] = False,
) -> None:
    """Continue a crashed, failed or cancelled run: recorded steps are not run again."""
    from keel.engine.api import resume as resume_run

    session, row = _session_for(ctx, run_id)
    rid: str = row.id
    if row.status == "SUCCEEDED":
        typer.echo(f"run {rid} already succeeded; there is nothing to resume")
    code = _execute(
        session, row.workflow, lambda: resume_run(rid, force=force, session=session), known_id=rid
    )
    raise typer.Exit(code)


def retry(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="A finished run to retry")],
) -> None:
    """Start a new run of a run's workflow (current code) reusing its succeeded steps."""
    from keel.engine.api import retry as retry_run

    session, row = _session_for(ctx, run_id)
    rid: str = row.id
    code = _execute(session, row.workflow, lambda: retry_run(rid, session=session), reused=True)
    raise typer.Exit(code)


def cancel(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run to stop")],
) -> None:
    """Stop a run: no new steps start; recorded results are kept for `keel resume`."""
    from keel.engine.api import cancel as cancel_run

    store = open_store(ctx)
    rid = store.resolve_run_id(run_id)
    before = store.get_run(rid)
    status = cancel_run(rid, store=store)
    if before is not None and before.status in ("SUCCEEDED", "FAILED"):
        fail(
            f"run {rid} already finished ({before.status}); there is nothing to cancel",
            hint=f"Start it again with `keel retry {rid}`" if before.status == "FAILED" else None,
        )
    if status == "CANCELLED":
        already = before is not None and before.status == "CANCELLED"
        typer.echo(f"run {rid} {'was already' if already else 'is now'} CANCELLED")
        typer.echo(f"continue it with: keel resume {rid}")
    else:
        host = f" in process {before.pid} on {before.host}" if before is not None else ""
        typer.echo(f"asked run {rid} ({status}){host} to stop; it stops starting new steps")
    raise typer.Exit(EXIT_OK if status in ("CANCELLED", "RUNNING", "PENDING") else EXIT_FAILED)
