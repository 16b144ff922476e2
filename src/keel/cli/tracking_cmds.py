"""`keel experiments ls` and `keel runs compare`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import EXIT_USAGE, fail, open_store

if TYPE_CHECKING:
    from rich.text import Text

    from keel.store.metadata import MetadataStore


def experiments_ls(ctx: typer.Context) -> None:
    """List experiments: id, name, number of runs and when the last one started."""
    import sqlalchemy as sa
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console
    from keel.store.schema import experiments, runs

    store = open_store(ctx)
    stmt = (
        sa.select(
            experiments.c.id,
            experiments.c.name,
            sa.func.count(runs.c.id).label("runs"),
            sa.func.max(runs.c.created_at).label("last"),
        )
        .select_from(
            experiments.outerjoin(
                runs,
                sa.and_(
                    runs.c.experiment_id == experiments.c.id, runs.c.lifecycle_stage == "active"
                ),
            )
        )
        .where(experiments.c.lifecycle_stage == "active")
        .group_by(experiments.c.id, experiments.c.name)
        .order_by(experiments.c.id)
    )
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = console()
    if not rows:
        out.print(f"no experiments in the store at {store.url}", markup=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("ID", "NAME", "RUNS", "LAST RUN"):
        table.add_column(name, justify="right" if name in ("ID", "RUNS") else "left")
    for row in rows:
        table.add_row(Text(str(row.id)), Text(row.name), Text(str(row.runs)), _when(row.last))
    out.print(table)


def _when(ts: float | None) -> Text:
    from datetime import UTC, datetime

    from rich.text import Text

    from keel.cli.display import when

    return Text(when(datetime.fromtimestamp(ts, UTC)) if ts is not None else "-")


# -- runs compare ------------------------------------------------------------------------


@dataclass
class _Tracked:
    """What one run recorded, keyed by (step key or '' for the run, key)."""

    run: Any
    params: dict[tuple[str, str], str] = field(default_factory=dict)
    metrics: dict[tuple[str, str], float] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)  # step key -> seq, for row order


def _load(store: MetadataStore, run_id: str) -> _Tracked:
    import sqlalchemy as sa

    from keel.store.schema import latest_metrics, params, runs, steps

    with store.engine.connect() as conn:
        row = conn.execute(sa.select(runs).where(runs.c.id == run_id)).one()
        keys = {-1: ""}
        for seq, key in conn.execute(
            sa.select(steps.c.seq, steps.c.key).where(steps.c.run_id == run_id)
        ):
            keys[seq] = key
        found = _Tracked(row, order={key: seq for seq, key in keys.items()})
        for seq, key, value in conn.execute(
            sa.select(params.c.seq, params.c.key, params.c.value).where(params.c.run_id == run_id)
        ):
            found.params[(keys.get(seq, str(seq)), key)] = value
        for seq, key, value, is_nan in conn.execute(
            sa.select(
                latest_metrics.c.seq,
                latest_metrics.c.key,
                latest_metrics.c.value,
                latest_metrics.c.is_nan,
            ).where(latest_metrics.c.run_id == run_id)
        ):
            number = math.nan if is_nan or value is None else float(value)
            found.metrics[(keys.get(seq, str(seq)), key)] = number
    return found


def _same(values: list[Any]) -> bool:
    first = values[0]
    for value in values[1:]:
        if isinstance(first, float) and isinstance(value, float):
            if not (first == value or (math.isnan(first) and math.isnan(value))):
                return False
        elif value != first:
            return False
    return True


def _cell(value: Any, differs: bool) -> Text:
    from rich.text import Text

    if value is None:
        return Text("-", style="dim")
    text = format(value, ".10g") if isinstance(value, float) else str(value)
    return Text(text, style="bold yellow" if differs else "")


def _label(step: str, key: str) -> Text:
    from rich.text import Text

    if not step:
        return Text(key)
    return Text(f"{step} · ", style="dim").append(key)


def compare(
    ctx: typer.Context,
    run_ids: Annotated[
        list[str], typer.Argument(help="Two or more runs (unambiguous id prefixes are enough)")
    ],
    show_all: Annotated[
        bool,
        typer.Option(
            "--all/--diff-only",
            help="Show every param and metric, differences marked (default), or only "
            "the ones that differ",
        ),
    ] = True,
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help="Only this metric (repeat for several)"),
    ] = None,
) -> None:
    """Params and final metrics of runs side by side; differing values are highlighted.

    Values logged inside steps appear as `STEP · key`.
    """
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, status_text
    from keel.errors import RunNotFoundError

    if len(run_ids) < 2:
        fail("give at least two runs to compare", code=EXIT_USAGE)
    store = open_store(ctx)
    resolved: list[str] = []
    for text in run_ids:
        try:
            resolved.append(store.resolve_run_id(text))
        except RunNotFoundError as exc:
            fail(exc.message, code=EXIT_USAGE)
    tracked = [_load(store, run_id) for run_id in resolved]
    wanted = set(metric) if metric else None

    table = Table(box=None, header_style="bold", pad_edge=False, show_lines=False)
    table.add_column("", no_wrap=True, width=1)
    table.add_column("KEY")
    for item in tracked:
        row = item.run
        header = Text(row.id, style="bold")
        header.append(f"\n{row.run_name or row.workflow}", style="")
        header.append("\n").append_text(status_text(row.status))
        table.add_column(header, no_wrap=False)

    def order(key: tuple[str, str]) -> tuple[int, str]:
        step, name = key
        seqs = [t.order[step] for t in tracked if step in t.order]
        return (min(seqs) if seqs else 1 << 30, step + "\0" + name)

    shown = differing = 0
    for title, attr in (("params", "params"), ("metrics", "metrics")):
        keys: set[tuple[str, str]] = set()
        for item in tracked:
            keys.update(getattr(item, attr))
        if attr == "metrics" and wanted is not None:
            keys = {k for k in keys if k[1] in wanted}
            keys |= {("", name) for name in wanted if not any(k[1] == name for k in keys)}
        rows = []
        for key in sorted(keys, key=order):
            values = [getattr(item, attr).get(key) for item in tracked]
            differs = not _same(values)
            if differs:
                differing += 1
            if differs or show_all:
                rows.append((key, values, differs))
        if not rows:
            continue
        table.add_row("", Text(title, style="bold underline"), *["" for _ in tracked])
        for (step, name), values, differs in rows:
            shown += 1
            table.add_row(
                Text("*", style="bold yellow") if differs else Text(""),
                _label(step, name),
                *[_cell(v, differs) for v in values],
            )
    out = console()
    if shown == 0:
        what = "no params or metrics differ" if not show_all else "no params or metrics"
        out.print(f"{what} in runs {', '.join(resolved)}", markup=False)
        return
    out.print(table)
    out.print(
        Text(
            f"{differing} of the compared values differ (marked *)"
            if differing
            else "all compared values are equal",
            style="dim",
        )
    )
