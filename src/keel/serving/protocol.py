"""MLflow's scoring protocol: what `POST /invocations` accepts and what it answers.

Accepted bodies (as MLflow's scoring server takes them, so its clients work as they are):
- `application/json`, an object with exactly one of
  - `dataframe_split`: `{"columns": [...], "data": [[...], ...]}` (optional `index`),
  - `dataframe_records`: `[{"col": value, ...}, ...]`,
  - `instances` or `inputs`: a list of rows (a tensor), a list of records, or an
    object of columns (`{"col": [values]}`),
  and optionally `params` (ignored: keel's flavors take none);
- `text/csv`: a header line and rows, as `DataFrame.to_csv(index=False)` writes.

The reply is `{"predictions": [...]}`: arrays as nested lists, a DataFrame as records.
Every error is a `ProtocolError` with the HTTP status and a machine-readable code.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
JSON_TYPE = "application/json"
CSV_TYPE = "text/csv"


class ProtocolError(Exception):
    """A request the endpoint refuses: `status`, `code`, a message and details."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


def _bad(message: str, **details: Any) -> ProtocolError:
    return ProtocolError(400, "BAD_REQUEST", message, details)


def parse(body: bytes, content_type: str | None) -> Any:
    """The request's data as the model takes it: a DataFrame or a numpy array."""
    mime, _, options = (content_type or JSON_TYPE).partition(";")
    mime = mime.strip().lower()
    charset = options.partition("charset=")[2].strip().strip('"').lower() or "utf-8"
    if charset not in ("utf-8", "utf8"):
        raise ProtocolError(415, "UNSUPPORTED_MEDIA_TYPE", "only UTF-8 bodies are accepted")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the body is not valid UTF-8: {exc}") from None
    if mime == CSV_TYPE:
        return _parse_csv(text)
    if mime != JSON_TYPE:
        raise ProtocolError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"content type {mime!r} is not accepted; send {JSON_TYPE} or {CSV_TYPE}",
        )
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(400, "BAD_JSON", f"the body is not valid JSON: {exc}") from None
    return parse_json(payload)


def parse_json(payload: Any) -> Any:
    if not isinstance(payload, dict):
        raise _bad(
            f"the body must be a JSON object with one of the fields {', '.join(FORMATS)}; "
            f"got a {type(payload).__name__}"
        )
    given = [key for key in FORMATS if key in payload]
    if len(given) != 1:
        raise _bad(
            f"the body must have exactly one of the fields {', '.join(FORMATS)}; "
            f"it has {', '.join(given) if given else 'none'} (fields: {', '.join(payload)})",
            fields=list(payload),
        )
    key = given[0]
    value = payload[key]
    if key == "dataframe_split":
        return _from_split(value)
    if key == "dataframe_records":
        return _from_records(value, key)
    return _from_tensor(value, key)


def _frame(*args: Any, **kwargs: Any) -> Any:
    import pandas as pd

    try:
        return pd.DataFrame(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise _bad(f"the data does not make a table: {exc}") from None


def _from_split(value: Any) -> Any:
    if not isinstance(value, dict) or "data" not in value:
        raise _bad('dataframe_split must be an object {"columns": [...], "data": [[...], ...]}')
    data, columns = value["data"], value.get("columns")
    if not isinstance(data, list) or (columns is not None and not isinstance(columns, list)):
        raise _bad("dataframe_split's data (and columns) must be lists")
    return _frame(data, columns=columns, index=value.get("index"))


def _from_records(value: Any, key: str) -> Any:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        raise _bad(f"{key} must be a list of objects, one per row")
    return _frame(value)


def _from_tensor(value: Any, key: str) -> Any:
    import numpy as np

    if isinstance(value, dict):  # named columns
        return _frame({k: v if isinstance(v, list) else [v] for k, v in value.items()})
    if not isinstance(value, list):
        raise _bad(f"{key} must be a list of rows or an object of columns")
    if value and all(isinstance(r, dict) for r in value):
        return _frame(value)
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise _bad(f"{key} is not a rectangular array: {exc}") from None
    if array.dtype.kind == "O":
        raise _bad(f"{key} is not a rectangular array of numbers or strings")
    return array


def _parse_csv(text: str) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(io.StringIO(text))
    except (ValueError, pd.errors.ParserError) as exc:
        raise _bad(f"the body is not CSV with a header line: {exc}") from None


def rows(data: Any) -> int:
    """How many rows a request carries (what micro-batching counts)."""
    return len(data)


def jsonable(predictions: Any) -> Any:
    """Predictions as JSON values: arrays as lists, a DataFrame as records."""
    if hasattr(predictions, "to_dict") and hasattr(predictions, "columns"):
        return predictions.to_dict(orient="records")
    if hasattr(predictions, "tolist"):
        return predictions.tolist()
    if isinstance(predictions, dict):
        return {str(k): jsonable(v) for k, v in predictions.items()}
    if isinstance(predictions, list | tuple):
        return [jsonable(p) for p in predictions]
    if hasattr(predictions, "item"):
        return predictions.item()
    return predictions


def reply(predictions: Any) -> bytes:
    return json.dumps({"predictions": jsonable(predictions)}).encode()
