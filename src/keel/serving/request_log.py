"""The inference log of a model server (`--log-requests`): sampled requests are queued
in memory and written to the store in batches by one background thread.

The request's path only draws the sample and puts a tuple on a bounded queue: it never
waits on the store, never encodes JSON. When the store is slow or gone the queue
fills, and what does not fit is dropped and counted (as is a batch whose write fails),
so `/health` and `/metrics` say how much of the traffic the log misses.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.serving import protocol
from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.serving")

BATCH_ROWS = 500  # rows per insert at most
FLUSH_SECONDS = 0.2  # how long the writer waits for more before writing what it has
DEFAULT_QUEUE_SIZE = 10_000


@dataclass(frozen=True)
class _Entry:
    model: str
    version: int | None
    time: float
    latency_ms: float
    status: int
    inputs: Any
    predictions: Any


class RequestLog:
    def __init__(
        self,
        store: MetadataStore,
        *,
        deployment_id: str | None,
        sample_rate: float = 1.0,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        on_drop: Callable[[int], None] | None = None,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.deployment_id = deployment_id
        self.sample_rate = sample_rate
        self.written = 0
        self.dropped = 0
        self._on_drop = on_drop
        self._on_write = on_write
        self._queue: queue.Queue[_Entry] = queue.Queue(maxsize=queue_size)
        self._random = random.Random()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_loop, name="keel-inference-log")
        self._thread.daemon = True  # a store that hangs must not keep the process alive
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (within `timeout`), then end the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def offer(
        self,
        model: str,
        version: int | None,
        arrived: float,
        seconds: float,
        status: int,
        inputs: Any,
        predictions: Any,
    ) -> None:
        """Queue one request if it is sampled; drop (and count) it when the queue is full."""
        if self.sample_rate < 1.0 and self._random.random() >= self.sample_rate:
            return
        entry = _Entry(model, version, arrived, seconds * 1000.0, status, inputs, predictions)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self._count_dropped(1)

    def state(self) -> dict[str, Any]:
        return {
            "sample_rate": self.sample_rate,
            "queued": self._queue.qsize(),
            "written": self.written,
            "dropped": self.dropped,
        }

    def _count_dropped(self, n: int) -> None:
        with self._lock:
            self.dropped += n
        if self._on_drop is not None:
            self._on_drop(n)

    def _write_loop(self) -> None:
        from keel.store import inference_log

        while True:
            try:
                batch = [self._queue.get(timeout=FLUSH_SECONDS)]
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            while len(batch) < BATCH_ROWS:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                rows = [self._row(entry) for entry in batch]
                inference_log.insert_many(self.store, rows)
            except Exception as exc:
                self._count_dropped(len(batch))
                log.warning("keel serve: %d logged requests not written: %s", len(batch), exc)
                continue
            with self._lock:
                self.written += len(batch)
            if self._on_write is not None:
                self._on_write(len(batch))

    def _row(self, entry: _Entry) -> dict[str, Any]:
        from keel.store.inference_log import MAX_JSON_CHARS

        inputs = _encode_inputs(entry.inputs)
        predictions = _encode(entry.predictions)
        truncated = False
        if inputs is not None and len(inputs) > MAX_JSON_CHARS:
            inputs, truncated = None, True
        if predictions is not None and len(predictions) > MAX_JSON_CHARS:
            predictions, truncated = None, True
        return {
            "model": entry.model,
            "version": entry.version,
            "deployment_id": self.deployment_id,
            "time": entry.time,
            "latency_ms": entry.latency_ms,
            "status": entry.status,
            "inputs": inputs,
            "predictions": predictions,
            "truncated": truncated,
        }


def _encode_inputs(data: Any) -> str | None:
    """A DataFrame as {"columns": [...], "data": [[...], ...]} (what the reader turns
    back into columns); anything else as its JSON value."""
    if data is None:
        return None
    if hasattr(data, "to_numpy") and hasattr(data, "columns"):
        # Row lists through json.dumps: DataFrame.to_json takes milliseconds for a
        # small wide frame, this a tenth of that. Missing values become null.
        import pandas as pd

        rows = data.to_numpy(dtype=object).tolist()
        if data.isna().to_numpy().any():
            missing = (None, pd.NA, pd.NaT)
            rows = [[None if _missing(v, missing) else v for v in row] for row in rows]
        columns = [str(c) for c in data.columns]
        return json.dumps({"columns": columns, "data": rows}, default=_plain)
    return _encode(data)


def _missing(value: Any, missing: tuple[Any, ...]) -> bool:
    return any(value is m for m in missing) or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars as numbers, timestamps as ISO text, anything else as its text."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _encode(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(protocol.jsonable(value), default=_plain)
