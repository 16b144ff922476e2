"""`keel.inference_log`: the requests a server logged (`keel serve --log-requests`), as
a pandas DataFrame a workflow can monitor drift with or build a training set from.

One DataFrame row per input row (a request of 3 rows gives 3 rows with one
`request_id`), with its own prediction. Tabular inputs become one column per input
column; other inputs (tensors, lists) one `inputs` column holding each row. An input
column named like a fixed column is prefixed with `inputs.`. A request without stored
inputs (refused before it was parsed, or over the size cap) is one row without them.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from keel.errors import ServingError

if TYPE_CHECKING:
    import pandas as pd

FIXED = ["time", "version", "latency_ms", "status", "request_id"]


def inference_log(
    name: str,
    version: int | str | None = None,
    since: datetime | float | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """The logged requests of model `name`: of one `version` (a number, an alias or
    "latest"; None for all), from `since` (a datetime or epoch seconds) on, the
    newest `limit` requests at most, oldest first.

    Columns: time (UTC), version, latency_ms, status, request_id, the inputs (one
    column per input column, else `inputs`), predictions, truncated (the request's
    inputs or predictions were over the stored size limit, and are missing)."""
    import pandas as pd

    from keel.store import inference_log as sql
    from keel.store import registry_store as rs
    from keel.tracking import registry
    from keel.tracking.models import check_name

    store = registry.registry_store()
    number: int | None = None
    if version is not None:
        number = registry.version_number(store, name, version)
    else:
        check_name(name)
        if rs.get_model(store, name) is None:
            raise rs.no_model(store, name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ServingError(
            f"limit must be a positive number, got {limit!r}", hint="e.g. limit=1000"
        )
    rows = sql.select(
        store, name, number, since=_epoch(since), limit=limit, newest_first=limit is not None
    )
    if limit is not None:
        rows.reverse()
    records: list[dict[str, Any]] = []
    for row in rows:
        records.extend(_expand(row))
    frame = pd.DataFrame.from_records(records)
    for column in [*FIXED, "predictions", "truncated"]:
        if column not in frame.columns:
            frame[column] = pd.Series(dtype=object)
    if len(frame):
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    inputs = [c for c in frame.columns if c not in (*FIXED, "predictions", "truncated")]
    return frame[[*FIXED, *inputs, "predictions", "truncated"]]


def _epoch(since: datetime | float | None) -> float | None:
    if since is None:
        return None
    if isinstance(since, datetime):
        return since.timestamp()
    if isinstance(since, int | float) and not isinstance(since, bool):
        return float(since)
    raise ServingError(
        f"since must be a datetime or epoch seconds, got {since!r}",
        hint="e.g. since=datetime.now(timezone.utc) - timedelta(days=1)",
    )


def _expand(row: Any) -> list[dict[str, Any]]:
    """A logged request's input rows, each with its prediction."""
    fixed = {
        "time": row.time,
        "version": row.version,
        "latency_ms": row.latency_ms,
        "status": row.status,
        "request_id": row.id,
        "truncated": bool(row.truncated),
    }
    inputs = json.loads(row.inputs) if row.inputs is not None else None
    predictions = json.loads(row.predictions) if row.predictions is not None else None
    if isinstance(inputs, dict) and set(inputs) >= {"columns", "data"}:
        taken = (*FIXED, "predictions", "truncated")
        columns = [f"inputs.{c}" if str(c) in taken else c for c in inputs["columns"]]
        each = [dict(zip(columns, values, strict=True)) for values in inputs["data"]]
    elif inputs is None:  # rejected before it was parsed, or over the size cap
        each = [{}]
    elif isinstance(inputs, list):
        each = [{"inputs": value} for value in inputs]
    else:
        each = [{"inputs": inputs}]
    if isinstance(predictions, list) and len(predictions) == len(each):
        outs: list[Any] = predictions
    else:  # no predictions (an error), or not one per row: each row gets all of them
        outs = [predictions] * len(each)
    return [{**fixed, **values, "predictions": out} for values, out in zip(each, outs, strict=True)]
