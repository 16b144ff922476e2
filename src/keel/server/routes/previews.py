"""Previews of recorded values and logged files, made without running stored code.

Only formats that cannot execute anything are opened: JSON, text, CSV, `.npy`
(numpy with allow_pickle=False) and Parquet. A cloudpickle value is never loaded:
it is offered for download as bytes. Every preview is cut to a few rows/items so
that a huge value costs the same as a small one.
"""

from __future__ import annotations

import base64
import codecs
import csv
import io
import json
import math
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel

HEAD_ROWS = 20
MAX_ITEMS = 100
MAX_TEXT = 64 * 1024
MAX_IMAGE = 1024 * 1024

PreviewKind = Literal["json", "text", "table", "array", "image", "binary"]

IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".svg": "image/svg+xml",
}
MEDIA_TYPES = {
    "json": "application/json",
    "numpy": "application/octet-stream",
    "parquet": "application/vnd.apache.parquet",
    "cloudpickle": "application/octet-stream",
}
EXTENSIONS = {"json": ".json", "numpy": ".npy", "parquet": ".parquet", "cloudpickle": ".pkl"}


class Preview(BaseModel):
    kind: PreviewKind
    media_type: str
    size: int
    truncated: bool = False
    text: str | None = None
    json_value: Any = None
    columns: list[str] | None = None
    rows: list[list[Any]] | None = None
    total_rows: int | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    data_base64: str | None = None
    note: str | None = None


def plain(value: Any, depth: int = 0) -> tuple[Any, bool]:
    """JSON-safe data (NaN and infinities as strings), cut to MAX_ITEMS per container;
    also whether anything was cut."""
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN", False
        if math.isinf(value):
            return ("Infinity" if value > 0 else "-Infinity"), False
        return value, False
    if value is None or isinstance(value, bool | int):
        return value, False
    if isinstance(value, str):
        return (value[:MAX_TEXT], True) if len(value) > MAX_TEXT else (value, False)
    if depth > 20:
        return "…", True
    if isinstance(value, dict):
        cut = len(value) > MAX_ITEMS
        out = {}
        for key, item in list(value.items())[:MAX_ITEMS]:
            out[str(key)], more = plain(item, depth + 1)
            cut = cut or more
        return out, cut
    if isinstance(value, list | tuple):
        cut = len(value) > MAX_ITEMS
        items = []
        for item in list(value)[:MAX_ITEMS]:
            clean, more = plain(item, depth + 1)
            items.append(clean)
            cut = cut or more
        return items, cut
    return str(value), False


def _head_text(data: bytes) -> str | None:
    """The start of `data` as UTF-8 text, or None if it is not text."""
    if b"\0" in data[:8192]:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return decoder.decode(data[:MAX_TEXT], final=len(data) <= MAX_TEXT)
    except UnicodeDecodeError:
        return None


def _json(data: bytes) -> Preview:
    try:
        value = json.loads(data)
    except ValueError:
        return _text(data, "application/json") or _binary(data, "application/json")
    if isinstance(value, str):
        cut = len(value) > MAX_TEXT
        return Preview(
            kind="text", media_type="text/plain", size=len(data), text=value[:MAX_TEXT],
            truncated=cut,
        )  # fmt: skip
    if isinstance(value, dict) and isinstance(value.get("columns"), list) and "data" in value:
        rows = value["data"] if isinstance(value["data"], list) else []
        if all(isinstance(r, list) for r in rows[:HEAD_ROWS]):  # a table saved orient="split"
            head, _ = plain([list(r) for r in rows[:HEAD_ROWS]])
            return Preview(
                kind="table",
                media_type="application/json",
                size=len(data),
                columns=[str(c) for c in value["columns"]],
                rows=head,
                total_rows=len(rows),
                truncated=len(rows) > HEAD_ROWS,
            )
    clean, cut = plain(value)
    return Preview(
        kind="json", media_type="application/json", size=len(data), json_value=clean, truncated=cut
    )


def _text(data: bytes, media_type: str = "text/plain") -> Preview | None:
    text = _head_text(data)
    if text is None:
        return None
    return Preview(
        kind="text",
        media_type=media_type,
        size=len(data),
        text=text,
        truncated=len(data) > MAX_TEXT,
    )


def _csv(data: bytes, delimiter: str) -> Preview:
    text = _head_text(data)
    if text is None:
        return _binary(data, "text/csv")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        lines = [row for _, row in zip(range(HEAD_ROWS + 1), reader, strict=False)]
    except csv.Error:
        return _text(data) or _binary(data, "text/csv")
    columns, rows = (lines[0], lines[1:]) if lines else ([], [])
    return Preview(
        kind="table",
        media_type="text/csv",
        size=len(data),
        columns=columns,
        rows=[list(r) for r in rows],
        truncated=len(data) > MAX_TEXT or len(rows) >= HEAD_ROWS,
    )


def _numpy(data: bytes) -> Preview:
    try:
        import numpy as np

        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:
        return _binary(data, "application/octet-stream", "not a readable .npy array")
    head = array[:HEAD_ROWS] if array.ndim else array
    values, cut = plain(head.tolist())
    return Preview(
        kind="array",
        media_type="application/octet-stream",
        size=len(data),
        shape=[int(n) for n in array.shape],
        dtype=str(array.dtype),
        json_value=values,
        truncated=cut or (array.ndim > 0 and array.shape[0] > HEAD_ROWS),
    )


def _parquet(data: bytes) -> Preview:
    try:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(io.BytesIO(data))
        total = table.metadata.num_rows
        batch = next(table.iter_batches(batch_size=HEAD_ROWS), None)
        columns = [str(name) for name in table.schema_arrow.names]
        head = batch.to_pylist() if batch is not None else []
    except Exception:
        return _binary(data, MEDIA_TYPES["parquet"], "not a readable Parquet file here")
    rows = [plain([row.get(c) for c in columns])[0] for row in head]
    return Preview(
        kind="table",
        media_type=MEDIA_TYPES["parquet"],
        size=len(data),
        columns=columns,
        rows=rows,
        total_rows=int(total),
        truncated=total > len(rows),
    )


def _binary(data: bytes, media_type: str, note: str | None = None) -> Preview:
    return Preview(kind="binary", media_type=media_type, size=len(data), note=note)


def _image(data: bytes, media_type: str) -> Preview:
    small = len(data) <= MAX_IMAGE
    return Preview(
        kind="image",
        media_type=media_type,
        size=len(data),
        data_base64=base64.b64encode(data).decode() if small else None,
        note=None if small else "too large to inline; download it",
    )


def preview_value(serializer: str, data: bytes) -> Preview:
    """A step output or run result, by the serializer that wrote it."""
    if serializer == "json":
        return _json(data)
    if serializer == "numpy":
        return _numpy(data)
    if serializer == "parquet":
        return _parquet(data)
    if serializer == "cloudpickle":
        return _binary(
            data,
            MEDIA_TYPES["cloudpickle"],
            "a pickled Python object: never loaded by the server; download it and load it "
            "with keel.Client in Python if you trust it",
        )
    return _binary(data, "application/octet-stream", f"serialized with {serializer}")


def preview_file(path: str, data: bytes) -> Preview:
    """A logged artifact, by its file extension (then by sniffing for text)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in IMAGE_TYPES:
        return _image(data, IMAGE_TYPES[suffix])
    if suffix == ".json":
        return _json(data)
    if suffix in (".csv", ".tsv"):
        return _csv(data, "\t" if suffix == ".tsv" else ",")
    if suffix == ".npy":
        return _numpy(data)
    if suffix == ".parquet":
        return _parquet(data)
    return _text(data) or _binary(data, "application/octet-stream")


def media_type_for_file(path: str) -> str:
    """The type a download of a logged file is served as: images and a few plain
    formats by name, everything else as bytes (never HTML, so nothing renders)."""
    suffix = PurePosixPath(path).suffix.lower()
    known = {
        **IMAGE_TYPES,
        ".json": "application/json",
        ".csv": "text/csv",
        ".txt": "text/plain",
        ".parquet": MEDIA_TYPES["parquet"],
    }
    return known.get(suffix, "application/octet-stream")
