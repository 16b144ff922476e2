"""`keel predict`: batch inference over a parquet or CSV file, as a durable run.

Bad input is refused before any run is recorded, with exit code 2: an unknown model,
alias or version; an input file that is missing, not parquet/CSV or unreadable; an
output path with another suffix or no folder; columns that do not fit the model's
signature. A run that fails later exits 1 and can be resumed (`keel resume RUN`):
chunks already predicted are not predicted again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keel.cli.common import EXIT_USAGE, fail, open_store
from keel.cli.running import ExecutorName, _execute


def predict(
    ctx: typer.Context,
    model_uri: Annotated[
        str,
        typer.Argument(metavar="MODEL_URI", help="models:/NAME@ALIAS, models:/NAME/N, runs:/..."),
    ],
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="The rows to predict: a .parquet or .csv file")
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            metavar="FILE",
            help="Write the predictions here (.parquet or .csv); they are recorded either way",
        ),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Rows per durable step (one step per chunk)")
    ] = 10_000,
    column: Annotated[str, typer.Option(help="The predictions' column name")] = "prediction",
    executor: Annotated[
        ExecutorName | None, typer.Option(help="Where the chunks run (default: threads)")
    ] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="At most this many chunks at once")
    ] = None,
) -> None:
    """Predict every row of a file with a registered model, in durable chunks."""
    from keel.errors import InputDataError, ModelRegistryError, SignatureError
    from keel.serving import batch

    store = open_store(ctx)
    try:
        if output is not None:
            batch.check_output_path(output)
        table = batch.read_table(input_path)
        from keel.tracking.models import load_model

        model = load_model(model_uri)
        if len(table):
            model.check_input(table.iloc[:1])
    except (InputDataError, ModelRegistryError, SignatureError) as exc:
        fail(exc.message, hint=exc.hint, code=EXIT_USAGE)
    from keel.engine.api import new_session, start_run

    params = {
        "model_uri": model_uri,
        "input_path": str(input_path.expanduser().resolve()),
        "output_path": str(output.expanduser().resolve()) if output is not None else None,
        "chunk_size": chunk_size,
        "column": column,
    }
    workflow = batch.predict_file
    session = new_session(
        store=store,
        executor=executor.value if executor else None,
        max_concurrency=max_concurrency,
    )
    code = _execute(
        session, f"predict {model_uri}", lambda: start_run(workflow, params, session=session)
    )
    raise typer.Exit(code)
