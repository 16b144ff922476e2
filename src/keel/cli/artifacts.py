"""`keel artifacts ls` and `keel artifacts get`: the outputs steps recorded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from keel.cli.common import EXIT_USAGE, fail, open_client

PRINT_LIMIT = 64 * 1024  # bigger outputs are only written to a file (-o)


def ls(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run (an unambiguous id prefix is enough)")],
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, help="At most this many steps")
    ] = 100,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Every step of the run")] = False,
) -> None:
    """List the output each step of a run recorded: type, size, serializer, hash."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, size, status_text

    client = open_client(ctx)
    run = client.run(run_id)
    steps = run.steps
    shown = steps if show_all else steps[:limit]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("STEP", "STATUS", "TYPE", "SIZE", "SERIALIZER", "HASH", "STORED"):
        table.add_column(name, no_wrap=True)
    for step in shown:
        if not step.has_output():
            table.add_row(Text(step.key), status_text(step.status), "-", "-", "-", "-", "-")
            continue
        table.add_row(
            Text(step.key),
            status_text(step.status),
            Text(step.output_type or "?"),
            Text(size(step.output_size)),
            Text(step.serializer or "?"),
            Text((step.output_hash or "")[:12]),
            Text("artifact" if step.output_ref else "inline"),
        )
    out = console()
    if not steps:
        out.print(f"run {run.id} has no steps", markup=False)
        return
    out.print(table)
    if len(shown) < len(steps):
        console(stderr=True).print(
            f"({len(steps) - len(shown)} more steps; --all lists them)", style="dim", markup=False
        )


def get(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The run")],
    step: Annotated[str, typer.Argument(help="A step: key (train-3), position, or unique task")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="FILE", help="Write the raw stored bytes here ('-': stdout)"
        ),
    ] = None,
) -> None:
    """Get a step's output: raw bytes into a file, or shown when it is small."""
    import json

    from rich.pretty import Pretty

    from keel.cli.display import console, size

    client = open_client(ctx)
    chosen = client.run(run_id).step(step)
    what = f"{chosen.output_type or 'value'}, {chosen.serializer}"
    if output is not None:
        data = chosen.output_bytes()
        if str(output) == "-":
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        else:
            output.write_bytes(data)
        console(stderr=True).print(
            f"wrote {size(len(data))} ({what}) of step {chosen.key} to {output}", markup=False
        )
        return
    if (chosen.output_size or 0) > PRINT_LIMIT:
        fail(
            f"the output of step {chosen.key} is {size(chosen.output_size)} ({what}), "
            "too big to print",
            hint=f"Write it to a file: keel artifacts get {chosen.run_id} {chosen.key} -o FILE",
            code=EXIT_USAGE,
        )
    out = console()
    if chosen.serializer == "json":
        # Shown from the stored bytes: exactly what was recorded, nothing to import.
        out.print(
            json.dumps(json.loads(chosen.output_bytes()), indent=2, ensure_ascii=False),
            markup=False,
        )
        return
    try:
        value = chosen.output()
    except Exception as exc:
        fail(
            f"the output of step {chosen.key} ({what}) cannot be read here: {exc}",
            hint="Get the raw bytes with -o FILE",
        )
    out.print(Pretty(value, max_length=50, max_string=2000))
