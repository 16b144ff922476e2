"""The summary printed when `keel run`, `resume` or `retry` ends."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.text import Text

from keel.cli import queries
from keel.cli.common import EXIT_FAILED, EXIT_OK
from keel.cli.display import STATUS_STYLES, duration, short_repr, status_text, user_traceback
from keel.client import Client, Run
from keel.errors import FIX_NEW_RUN, FIX_RESUME, fix_for
from keel.store.metadata import MetadataStore

_COUNT_ORDER = ("SUCCEEDED", "CACHED", "FAILED", "SKIPPED", "RUNNING", "PENDING")


def counts_line(counts: dict[str, int]) -> Text:
    total = sum(counts.values())
    text = Text(f"{total:,}")
    shown = [(s, counts[s]) for s in _COUNT_ORDER if counts.get(s)]
    shown += [(s, n) for s, n in counts.items() if s not in _COUNT_ORDER and n]
    if shown:
        text.append(" (")
        for i, (status, n) in enumerate(shown):
            if i:
                text.append(", ")
            text.append(f"{n:,} {status.lower()}", style=STATUS_STYLES.get(status, ""))
        text.append(")")
    return text


def result_text(store: MetadataStore, run: Run) -> Text:
    info = queries.result_info(store, run.id)
    if info is None or info.result_serializer is None:
        return Text("None")
    if info.result_ref is not None:
        # Big results live in the artifact store; reading one just for a repr can be slow.
        return Text(f"<{info.result_type or 'value'} in the artifact store>", style="dim")
    try:
        return Text(short_repr(run.result()))
    except Exception as exc:
        return Text(f"<{info.result_type} that cannot be read here: {exc}>", style="dim")


def _failing_step(store: MetadataStore, run_id: str, depth: int = 0) -> tuple[str, Any] | None:
    """The first failed step, followed into child runs: (run id, step row)."""
    rows = queries.failed_steps(store, run_id, limit=1)
    if not rows:
        return None
    row = rows[0]
    if row.kind == "workflow" and row.child_run_id and depth < 10:
        inner = _failing_step(store, row.child_run_id, depth + 1)
        if inner is not None:
            return inner
    return run_id, row


def print_failure(console: Console, store: MetadataStore, run: Run) -> tuple[str | None, str]:
    """Print the error, the failing step and its traceback; the error that caused the
    failure: (type, message), the failing step's when there is one."""
    if run.error_type or run.error_message:
        line = Text("error: ", style="bold red")
        # Records written before messages were made never empty may hold "".
        line.append(f"{run.error_type}: {run.error_message or '(no message)'}")
        console.print(line)
    cause: tuple[str | None, str] = (run.error_type, run.error_message or "")
    found = _failing_step(store, run.id)
    tb: str | None = run.traceback
    if found is not None:
        run_id, row = found
        where = row.key if run_id == run.id else f"{row.key} of child run {run_id}"
        line = Text("failed step: ", style="bold")
        line.append(where)
        same = bool(run.error_message) and (row.error_message or "").startswith(
            run.error_message or ""
        )
        if row.error_type and not same:
            line.append(f" ({row.error_type}: {row.error_message})")
        console.print(line)
        attempts = store.load_attempts(run_id, row.seq)
        tb = next((a.traceback for a in reversed(attempts) if a.traceback), None)
        if row.error_type:
            cause = (row.error_type, row.error_message or "")
    shown = user_traceback(tb) if tb else ""
    if shown:
        console.print(Text(shown, style="dim"))
    return cause


def print_fix(console: Console, run: Run, error_type: str | None, message: str) -> None:
    """The command that fixes this failure: the environment failed (resume the same
    run once it is fixed), the code failed (fix it, retry), or a parameter was bad
    (neither: the same parameters would fail again)."""
    fix = fix_for(error_type, message)
    if fix == FIX_RESUME:
        console.print(
            Text("the environment failed, not the code (disk, memory or the metadata store)")
        )
        console.print(
            Text(f"once it is fixed, continue the run: keel resume {run.id}", "yellow"),
            soft_wrap=True,  # a command stays on one line, to be copied whole
        )
    elif fix == FIX_NEW_RUN:
        where = run.entrypoint or run.workflow
        console.print(Text("a parameter is wrong: resuming or retrying would fail the same way"))
        console.print(
            Text(
                f"start a new run with corrected parameters: keel run {where} --param NAME=VALUE",
                "yellow",
            ),
            soft_wrap=True,
        )
    else:
        console.print(Text(f"fix the code, then: keel retry {run.id}", "yellow"), soft_wrap=True)


def print_outcome(
    console: Console, store: MetadataStore, run_id: str, *, replayed: int = 0, reused: bool = False
) -> int:
    """Summarise the run; the exit code says whether it succeeded."""
    run = Client(store=store).run(run_id)
    counts = queries.step_counts(store, [run.id])[run.id]
    head = Text("run ", style="bold")
    head.append(run.id, style="bold")
    head.append(f"  {run.workflow}  ")
    head.append_text(status_text(run.status))
    head.append(f"  in {duration(run.duration)}")
    console.print(head)
    steps = Text("steps: ").append_text(counts_line(counts))
    if replayed:
        source = f"reused from run {run.retry_of}" if reused else "replayed from the record"
        steps.append(f"; {replayed:,} {source}", style="magenta")
    console.print(steps)
    if run.status == "SUCCEEDED":
        console.print(Text("result: ").append_text(result_text(store, run)))
        return EXIT_OK
    if run.status == "FAILED":
        error_type, message = print_failure(console, store, run)
        console.print(Text(f"see: keel runs show {run.id}", style="yellow"))
        print_fix(console, run, error_type, message)
    else:
        console.print(Text(f"continue it with: keel resume {run.id}", style="yellow"))
    return EXIT_FAILED
