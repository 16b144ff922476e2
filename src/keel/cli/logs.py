"""`keel logs`: what steps printed and logged, per attempt."""

from __future__ import annotations

import time
from itertools import groupby
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import EXIT_USAGE, fail, open_client
from keel.status import FINISHED_RUN

if TYPE_CHECKING:
    from rich.console import Console

    from keel.client import Client, Run, Step

STREAM_STYLES = {"stdout": "", "stderr": "red", "log": "cyan"}
FOLLOW_POLL_SECONDS = 0.5


def _print_chunks(out: Console, rows: list[Any], keys: dict[int, str], run_id: str) -> int:
    """Print log rows grouped by step and attempt; returns how many groups there were."""
    rows = sorted(rows, key=lambda r: (r.seq, r.attempt, r.id))
    groups = 0
    for (seq, attempt), chunk in groupby(rows, key=lambda r: (r.seq, r.attempt)):
        groups += 1
        _print_header(out, run_id, keys.get(seq, f"#{seq}"), attempt)
        for row in chunk:
            _print_row(out, row)
    return groups


def _print_header(out: Console, run_id: str, key: str, attempt: int) -> None:
    from rich.text import Text

    out.print(Text(f"── {run_id} {key} · attempt {attempt} ──", style="bold dim"))


def _print_row(out: Console, row: Any) -> None:
    from rich.text import Text

    text = row.text if row.text.endswith("\n") else row.text + "\n"
    out.print(Text(text, style=STREAM_STYLES.get(row.stream, "")), end="")


def _follow(
    out: Console, client: Client, run: Run, step: tuple[int, str] | None, attempt: int | None
) -> bool:
    """Print output as it is recorded, in recorded order, until the run (and with no
    STEP given, its child runs) has ended and everything it recorded is printed.
    Whether anything was printed."""
    store = client.store
    cursors: dict[str, int] = {}
    keys: dict[str, dict[int, str]] = {}
    header: tuple[str, int, int] | None = None
    printed_any = False
    while True:
        top = store.get_run(run.id)
        # The status is read before the rows: rows committed before the end are all seen.
        ended = top is None or top.status in FINISHED_RUN
        followed = [run] if step is not None else _descendants(client, run)
        printed = False
        for each in followed:
            seq = None if step is None else step[0]
            for row in store.load_logs(each.id, seq, attempt, after=cursors.get(each.id)):
                if header != (each.id, row.seq, row.attempt):
                    header = (each.id, row.seq, row.attempt)
                    _print_header(out, each.id, _step_key(keys, each, row.seq), row.attempt)
                _print_row(out, row)
                cursors[each.id] = row.id
                printed = True
        printed_any = printed_any or printed
        if ended and not printed:
            return printed_any
        if not printed:
            time.sleep(FOLLOW_POLL_SECONDS)


def _step_key(keys: dict[str, dict[int, str]], run: Run, seq: int) -> str:
    """A step's key by position, read again only when a new step appears."""
    known = keys.get(run.id, {})
    if seq not in known:
        known = keys[run.id] = {s.seq: s.key for s in run.steps}
    return known.get(seq, f"#{seq}")


def _say_nothing_printed(what: Run | Step, attempt: int | None) -> None:
    """On stderr: the run or step printed nothing, and where its output is if elsewhere."""
    from keel.cli.display import console
    from keel.client import Run

    if isinstance(what, Run):
        note = f"no output was captured for run {what.id}"
    else:
        which = f" in attempt {attempt}" if attempt else ""
        note = f"step {what.key} ({what.status}) printed nothing{which}"
        if what.child_run_id:
            note += f"; it is a child run: keel logs {what.child_run_id}"
        elif what.cached_from:
            # Reused (retry) or cached steps did not run here; their output came from elsewhere.
            source, _, key = what.cached_from.partition("/")
            note += f"; its output came from run {source}: keel logs {source} {key}"
    console(stderr=True).print(note, markup=False)


def _descendants(client: Client, run: Run, depth: int = 0) -> list[Run]:
    found = [run]
    if depth < 8:
        for child in run.children():
            found.extend(_descendants(client, child, depth + 1))
    return found


def logs(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (an unambiguous id prefix is enough)")],
    step: Annotated[
        str | None,
        typer.Argument(help="A step: its key (train-3), its position (3) or a task run once"),
    ] = None,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="Only this attempt of the step")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow", "-f", help="Keep printing output as steps print it, until the run ends"
        ),
    ] = False,
) -> None:
    """Show the captured stdout, stderr and logging of a run's steps."""
    from keel.cli.display import console

    client = open_client(ctx)
    run = client.run(run_id)
    out = console()
    store = client.store
    if step is None and attempt is not None:
        fail(
            "--attempt needs a STEP",
            hint=f"e.g. keel logs {run.id} STEP --attempt 2",
            code=EXIT_USAGE,
        )
    if follow:
        chosen_step = None if step is None else run.step(step)
        where = None if chosen_step is None else (chosen_step.seq, chosen_step.key)
        if not _follow(out, client, run, where, attempt):
            # Read again: the step's status (and where its output came from) as it ended.
            ended = client.run(run.id)
            _say_nothing_printed(ended if step is None else ended.step(step), attempt)
        return
    if step is None:
        groups = 0
        for each in _descendants(client, run):
            keys = {s.seq: s.key for s in each.steps}
            groups += _print_chunks(out, store.load_logs(each.id), keys, each.id)
        if not groups:
            _say_nothing_printed(run, None)
        return
    chosen = run.step(step)
    made = len(chosen.attempts)
    if attempt is not None and attempt > made:
        fail(
            f"step {chosen.key} of run {run.id} made {made} attempt{'s' if made != 1 else ''}",
            hint=f"Pick --attempt between 1 and {made}" if made else None,
            code=EXIT_USAGE,
        )
    rows = store.load_logs(run.id, chosen.seq, attempt)
    if not _print_chunks(out, rows, {chosen.seq: chosen.key}, run.id):
        _say_nothing_printed(chosen, attempt)
