"""The steps of a run as a Rich tree, child runs nested under their step.

A run with more than `FULL_LIMIT` steps is shown grouped by task: per task the
counts by status, the first few steps and the failed ones, so `keel runs show`
stays readable (and fast) for a 100,000-step fan-out. `--all` lists every step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rich.text import Text
from rich.tree import Tree

from keel.cli import queries
from keel.cli.display import STATUS_STYLES, duration, status_text
from keel.client import Client, Step
from keel.errors import RunNotFoundError

FULL_LIMIT = 60  # up to this many steps, every step gets its own line
FIRST_SHOWN = 3  # in a grouped task, its first steps
FAILED_SHOWN = 10  # and up to this many failed (or skipped) ones
MAX_DEPTH = 8  # child runs nested deeper than this are not expanded


@dataclass
class TreeOptions:
    show_all: bool = False
    failed: list[Step] = field(default_factory=list)  # every failed step shown, in order


def step_label(step: Step, attempts: int | None) -> Text:
    text = Text(step.key, style="bold")
    text.append("  ")
    text.append_text(status_text(step.status))
    text.append(f"  {duration(step.duration)}", style="dim")
    if attempts and attempts > 1:
        text.append(f"  {attempts} attempts", style="yellow")
    if step.cached_from:
        if step.status == "CACHED":
            text.append(f"  CACHED from {step.cached_from}", style="blue")
        else:
            text.append(f"  reused from {step.cached_from}", style="magenta")
    if step.child_run_id:
        text.append(f"  child run {step.child_run_id}", style="dim")
    if step.status in ("FAILED", "SKIPPED") and (step.error_type or step.error_message):
        style = "red" if step.status == "FAILED" else "dim"
        text.append(f"  {step.error_type}: {step.error_message}", style=style)
    return text


def _group_label(task: str, steps: list[Step]) -> Text:
    counts = Counter(s.status for s in steps)
    text = Text(task, style="bold")
    text.append(f"  {len(steps):,} steps: ")
    for i, (status, n) in enumerate(sorted(counts.items())):
        if i:
            text.append(", ")
        text.append(f"{n:,} {status.lower()}", style=STATUS_STYLES.get(status, ""))
    spent = sum(s.duration or 0.0 for s in steps)
    text.append(f"  {duration(spent)} in steps", style="dim")
    return text


def _shown_in_group(steps: list[Step]) -> list[Step]:
    first = steps[:FIRST_SHOWN]
    bad = [s for s in steps[FIRST_SHOWN:] if s.status in ("FAILED", "SKIPPED", "RUNNING")]
    return first + bad[:FAILED_SHOWN]


def add_steps(
    client: Client, node: Tree, run_id: str, steps: list[Step], opts: TreeOptions, depth: int = 0
) -> None:
    """Add `steps` (all of one run) under `node`."""
    grouped = not opts.show_all and len(steps) > FULL_LIMIT
    if not grouped:
        layout: list[tuple[Step | None, list[Step]]] = [(s, [s]) for s in steps]
    else:
        by_task: dict[str, list[Step]] = {}
        for s in steps:
            by_task.setdefault(s.task, []).append(s)
        layout = [(None if len(g) > 1 else g[0], g) for g in by_task.values()]
    shown = [
        s for single, group in layout for s in ([single] if single else _shown_in_group(group))
    ]
    attempts = queries.attempt_counts(client.store, run_id, [s.seq for s in shown])
    for single, group in layout:
        if single is not None:
            _add_step(client, node, single, attempts.get(single.seq), opts, depth)
            continue
        branch = node.add(_group_label(group[0].task, group))
        picked = _shown_in_group(group)
        for s in picked:
            _add_step(client, branch, s, attempts.get(s.seq), opts, depth)
        hidden = len(group) - len(picked)
        if hidden:
            branch.add(Text(f"… {hidden:,} more (--all lists every step)", style="dim"))


def _add_step(
    client: Client, node: Tree, step: Step, attempts: int | None, opts: TreeOptions, depth: int
) -> None:
    branch = node.add(step_label(step, attempts))
    if step.status == "FAILED" and step.kind != "workflow":
        opts.failed.append(step)
    if step.kind != "workflow" or not step.child_run_id:
        return
    if depth >= MAX_DEPTH:
        branch.add(Text(f"… see keel runs show {step.child_run_id}", style="dim"))
        return
    try:
        child = client.run(step.child_run_id)
    except RunNotFoundError:
        return  # the child never started (e.g. cancelled while waiting for inputs)
    add_steps(client, branch, child.id, child.steps, opts, depth + 1)
