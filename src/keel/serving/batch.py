"""Batch inference: `keel.batch_predict(model_uri, data, chunk_size=10_000)`.

Inside a workflow it is three kinds of durable step, made with the ordinary task
machinery so a crashed run resumes like any map: `batch_predict.resolve` pins the
model URI to a version (an alias that moves later does not change a resumed run)
and checks the first row against the model's signature; one `batch_predict.chunk`
step per `chunk_size` rows predicts that chunk; `batch_predict.collect` joins the
chunks into one table in the input's row order, recorded as the step's output
(parquet when pandas is installed, else a numpy array). Chunks recorded before a
crash are not predicted again on resume.

The data is a pandas DataFrame, a numpy array, a list of rows, or the path of a
parquet or CSV file (read in the workflow body: it must not change before a resume;
`predict_file` checks that). Outside a workflow, a path runs the `batch_predict`
workflow (`predict_file`) durably and returns its predictions; in-memory data there
is an error (use `keel.load_model(uri).predict(data)`, or call it in a workflow).
`keel predict` on the command line runs `predict_file` too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from keel.errors import DefinitionError, InputDataError, ParameterError
from keel.sdk.context import current_runtime
from keel.sdk.definitions import task, workflow

DEFAULT_CHUNK_SIZE = 10_000
FORMATS = (".parquet", ".pq", ".csv")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _cached_model(uri: str) -> Any:
    from keel.serving.model_cache import shared
    from keel.tracking.models import load_uncached

    return shared().get(uri, load_uncached)


# -- files ---------------------------------------------------------------------------------


def _format(path: Path, what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InputDataError(
            f"{what} {path} is neither parquet nor CSV (its suffix is {suffix or 'missing'!r})",
            hint="Name it .parquet (or .pq) or .csv",
        )
    return "csv" if suffix == ".csv" else "parquet"


def read_table(path: str | Path) -> Any:
    """A parquet or CSV file as a DataFrame; InputDataError when it cannot be read."""
    file = Path(path).expanduser()
    kind = _format(file, "input")
    if not file.is_file():
        raise InputDataError(f"no such input file: {file}", hint="Check the path")
    pd = _pandas()
    if pd is None:
        raise InputDataError("reading parquet or CSV files needs pandas", hint="pip install pandas")
    try:
        return pd.read_csv(file) if kind == "csv" else pd.read_parquet(file)
    except Exception as exc:
        raise InputDataError(
            f"cannot read {file} as {kind}: {type(exc).__name__}: {exc}",
            hint="Check that the file is a complete, valid table",
        ) from None


def check_output_path(path: str | Path) -> Path:
    file = Path(path).expanduser()
    _format(file, "output")
    if not file.parent.is_dir():
        raise InputDataError(
            f"the output folder {file.parent} does not exist", hint="Create it first"
        )
    return file


def write_table(table: Any, path: str | Path) -> int:
    """Write predictions to parquet or CSV (by suffix); returns the number of rows."""
    file = check_output_path(path)
    pd = _pandas()
    frame = table if pd is not None and isinstance(table, pd.DataFrame) else None
    if frame is None:
        if pd is None:
            raise InputDataError(
                "writing parquet or CSV files needs pandas", hint="pip install pandas"
            )
        frame = pd.DataFrame(_columns(table, "prediction"))
    if _format(file, "output") == "csv":
        frame.to_csv(file, index=False)
    else:
        frame.to_parquet(file, index=False)
    return len(frame)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- splitting and joining -------------------------------------------------------------------


def _as_table(data: Any) -> Any:
    """`data` as something with rows that slices: a DataFrame, an array, or a path read."""
    if isinstance(data, str | Path):
        return read_table(data)
    pd = _pandas()
    if pd is not None and isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if pd is None:
            raise InputDataError("a list of records needs pandas", hint="pip install pandas")
        return pd.DataFrame(data)
    import numpy as np

    try:
        array = np.asarray(data)
    except Exception as exc:
        raise InputDataError(f"cannot use a {type(data).__name__} as rows: {exc}") from None
    if array.ndim == 0:
        raise InputDataError(
            f"batch_predict needs rows, got a single {type(data).__name__}",
            hint="Pass a DataFrame, a 2-D array, a list of rows, or a parquet/CSV path",
        )
    return array


def _chunks(table: Any, size: int) -> list[Any]:
    rows = len(table)
    if hasattr(table, "iloc"):
        return [table.iloc[i : i + size] for i in range(0, rows, size)]
    return [table[i : i + size] for i in range(0, rows, size)]


def _columns(predictions: Any, column: str) -> dict[str, Any]:
    import numpy as np

    array = np.asarray(predictions)
    if array.ndim <= 1:
        return {column: array.reshape(-1)}
    flat = array.reshape(len(array), -1)
    return {f"{column}_{j}": flat[:, j] for j in range(flat.shape[1])}


@task(name="batch_predict.resolve")
def resolve_model(model_uri: str, sample: Any) -> str:
    """The URI pinned to a version; checks that the model loads and `sample` fits it."""
    uri = model_uri.strip()
    pinned = uri
    if uri.startswith("models:/"):
        from keel.tracking.models import parse_models_uri
        from keel.tracking.registry import registry_store, version_number

        name, ref = parse_models_uri(uri)
        pinned = f"models:/{name}/{version_number(registry_store(), name, ref)}"
    model = _cached_model(pinned)
    if sample is not None:
        model.check_input(sample)
    return pinned


@task(name="batch_predict.chunk")
def predict_chunk(chunk: Any, model_uri: str) -> Any:
    """Predictions for one chunk of rows, as an array (one entry per row)."""
    import numpy as np

    predictions = np.asarray(_cached_model(model_uri).predict(chunk))
    if len(predictions) != len(chunk):
        raise InputDataError(
            f"model {model_uri} returned {len(predictions)} predictions for {len(chunk)} rows",
            hint="batch_predict needs a model whose predict returns one entry per row",
        )
    return predictions


@task(name="batch_predict.collect")
def collect(parts: list[Any], index: Any, column: str) -> Any:
    """The chunks' predictions as one table, in the input's row order."""
    import numpy as np

    joined = np.concatenate([np.asarray(p) for p in parts]) if parts else np.empty(0)
    pd = _pandas()
    if pd is None:
        return joined
    return pd.DataFrame(_columns(joined, column), index=index)


def batch_predict(
    model_uri: str,
    data: Any,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    column: str = "prediction",
) -> Any:
    """Predict `data` with the model `model_uri` in durable chunks of `chunk_size` rows.

    Inside a workflow: one step per chunk (resumable like any map), and the joined
    predictions (a DataFrame with a `column` column, or `column_0`, `column_1`... for
    several outputs per row) recorded as the `batch_predict.collect` step's output.
    Outside a workflow: `data` must be a parquet or CSV path; the `batch_predict`
    workflow runs durably and its predictions are returned.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ParameterError(f"chunk_size must be a whole number >= 1, got {chunk_size!r}")
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise ParameterError(f"model_uri must be a model URI string, got {model_uri!r}")
    if current_runtime() is None:
        if isinstance(data, str | Path):
            from keel.engine.api import run

            handle = run(
                predict_file,
                model_uri=model_uri,
                input_path=str(data),
                chunk_size=chunk_size,
                column=column,
            )
            return handle.result()
        raise DefinitionError(
            "keel.batch_predict with in-memory data runs inside a workflow",
            hint="Call it in a @keel.workflow, pass a parquet or CSV path to run one, or "
            "use keel.load_model(uri).predict(data) for a plain call",
        )
    table = _as_table(data)
    sample = table.iloc[:1] if hasattr(table, "iloc") else table[:1]
    pinned = resolve_model.submit(model_uri, sample if len(table) else None)
    parts = predict_chunk.map(_chunks(table, chunk_size), model_uri=pinned)
    index = table.index if hasattr(table, "index") and hasattr(table, "iloc") else None
    return collect(parts, index, column)


@task(name="batch_predict.input")
def _input_fingerprint(digest: str) -> str:
    return digest


@task(name="batch_predict.write")
def _write(predictions: Any, output_path: str) -> dict[str, Any]:
    return {"rows": write_table(predictions, output_path), "output": output_path}


@workflow(name="batch_predict")
def predict_file(
    model_uri: str,
    input_path: str,
    output_path: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    column: str = "prediction",
) -> Any:
    """Predict a parquet or CSV file in durable chunks; write the predictions to
    `output_path` (parquet or CSV) and return `{"rows", "output"}`, or return them."""
    path = Path(input_path).expanduser()
    _format(path, "input")
    if not path.is_file():
        raise InputDataError(f"no such input file: {path}", hint="Check the path")
    now = file_digest(path)
    recorded = _input_fingerprint(now)
    if recorded != now:  # a resumed run: its recorded chunks came from the old file
        raise InputDataError(
            f"{path} changed since this run started",
            hint="Start a new run for the new file (recorded chunks belong to the old one)",
        )
    predictions = batch_predict(model_uri, read_table(path), chunk_size=chunk_size, column=column)
    if output_path is None:
        return predictions
    return _write(predictions, output_path)
