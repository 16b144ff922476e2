"""`keel cache explain` (why a step was, or was not, served from the cache) and
`keel cache clear`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import open_client, open_store

if TYPE_CHECKING:
    from rich.console import Console

    from keel.client import Step
    from keel.store.metadata import MetadataStore

_PART_MEANING = {
    "task": "the task name",
    "code_hash": "the task's source code changed",
    "cache_version": "cache_version changed",
}


def key_differences(mine: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(part, this value, other value) for each part of two cache keys that differs."""
    diffs = [
        (part, mine.get(part), other.get(part))
        for part in ("task", "code_hash", "cache_version")
        if mine.get(part) != other.get(part)
    ]
    a: dict[str, Any] = mine.get("inputs") or {}
    b: dict[str, Any] = other.get("inputs") or {}
    for name in sorted(set(a) | set(b)):
        if a.get(name) != b.get(name):
            diffs.append((f"input {name}", a.get(name), b.get(name)))
    return diffs


def _short(value: Any) -> str:
    if value is None:
        return "(none)"
    text = str(value)
    return text[:16] + "…" if len(text) > 24 else text


def _print_parts(out: Console, info: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("key", Text(str(info.get("key"))))
    grid.add_row("task", Text(str(info.get("task"))))
    grid.add_row("code_hash", Text(str(info.get("code_hash"))))
    grid.add_row("cache_version", Text(_short(info.get("cache_version"))))
    inputs: dict[str, Any] = info.get("inputs") or {}
    if not inputs:
        grid.add_row("inputs", Text("(none)"))
    for name, digest in inputs.items():
        grid.add_row(f"input {name}", Text(str(digest)))
    out.print(grid)


def _explain_miss(out: Console, store: MetadataStore, step: Step, info: dict[str, Any]) -> None:
    import json

    from rich.table import Table
    from rich.text import Text

    from keel.cli import queries

    before = step.started_at.timestamp() if step.started_at else time.time()
    rows = queries.earlier_cached_steps(store, step.task, before, exclude=(step.run_id, step.seq))
    if not rows:
        out.print(
            Text(
                f"MISS: no earlier step of task {step.task} has a cache key: this was its first "
                "cached run (or the earlier runs were made before it had cache=True)",
                style="yellow",
            )
        )
        return
    best: tuple[Any, list[tuple[str, Any, Any]]] | None = None
    for candidate in rows:  # newest first, so ties go to the most recent step
        other = json.loads(candidate.cache_info)
        found = key_differences(info, other)
        if best is None or len(found) < len(best[1]):
            best = (candidate, found)
    assert best is not None
    row, diffs = best
    where = f"run {row.run_id} step {row.key}"
    if not diffs:
        out.print(
            Text(
                f"MISS although {where} has the same key: its entry was not in the cache when this "
                "step looked (cleared with `keel cache clear`, or that step had not finished yet)",
                style="yellow",
            )
        )
        return
    out.print(Text(f"MISS: compared with the closest earlier step, {where}:", style="yellow"))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("PART", "THIS STEP", "EARLIER STEP", "MEANING"):
        table.add_column(name)
    for part, mine, theirs in diffs:
        meaning = _PART_MEANING.get(part, "different input content")
        table.add_row(Text(part), Text(_short(mine)), Text(_short(theirs)), Text(meaning))
    out.print(table)


def explain(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run")],
    step: Annotated[str, typer.Argument(help="A step: key (train-3), position, or unique task")],
) -> None:
    """Show the parts of a step's cache key, and why it was a hit or a miss."""
    from rich.text import Text

    from keel.cli.display import console

    client = open_client(ctx)
    chosen = client.run(run_id).step(step)
    out = console()
    out.print(
        Text(
            f"step {chosen.key} of run {chosen.run_id} (task {chosen.task}, {chosen.status})",
            style="bold",
        )
    )
    info = chosen.cache
    if info is None:
        out.print(
            Text(
                f"task {chosen.task} does not use the cache: nothing was looked up. "
                "Declare it with @keel.task(cache=True) to reuse outputs across runs",
            )
        )
        if chosen.cached_from:
            out.print(Text(f"(its output was reused from {chosen.cached_from} by keel retry)"))
        return
    _print_parts(out, info)
    if chosen.status == "CACHED":
        out.print(Text(f"HIT: the value was reused from {chosen.cached_from}", style="green"))
    elif chosen.cached_from:
        out.print(
            Text(
                f"reused from {chosen.cached_from} by `keel retry` (no cache lookup in this run)",
                style="magenta",
            )
        )
    elif chosen.status in ("PENDING", "SKIPPED"):
        out.print(Text(f"the step is {chosen.status}: it did not reach the cache"))
    else:
        _explain_miss(out, client.store, chosen, info)


def clear(
    ctx: typer.Context,
    task: Annotated[str | None, typer.Option("--task", help="Only entries of this task")] = None,
) -> None:
    """Forget cache entries so that steps run again. Recorded outputs are kept."""
    dropped = open_store(ctx).clear_cache(task)
    scope = f" of task {task}" if task else ""
    typer.echo(
        f"dropped {dropped} cache entr{'y' if dropped == 1 else 'ies'}{scope}; "
        "recorded step outputs are kept"
    )
