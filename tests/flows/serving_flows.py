"""Workflows served over HTTP by tests/test_serving_workflows.py, and the models
the batch-prediction tests register (saved with the pyfunc flavor)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

import keel


@keel.task
def scaled(x: int, scale: float) -> float:
    return x * scale


@keel.task
def total(parts: list[float], fail: bool, log: bool) -> float:
    if fail:
        raise ValueError(f"asked to fail after {len(parts)} parts")
    if log:
        keel.log_metric("parts", len(parts))
    return float(sum(parts))


@keel.workflow
def pipeline(n: int, scale: float = 1.0, fail: bool = False, log: bool = False) -> dict[str, Any]:
    """n scaled numbers summed by a second step; the result holds a numpy array."""
    parts = scaled.map(range(n), scale=scale)
    return {"n": n, "sum": total(parts, fail, log), "squares": np.arange(n) ** 2}


@keel.task
def predict_with(uri: str, x: float) -> float:
    # Loaded on every call on purpose: the serving process's cache answers.
    return float(keel.load_model(uri).predict([[x]])[0])


@keel.workflow
def scored(x: float, uri: str = "models:/offset@live") -> dict[str, Any]:
    offset = keel.load_model(uri).unwrap().offset
    return {"score": predict_with(uri, x), "offset": offset}


class Offset:
    """Predicts the first column plus an offset."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def predict(self, rows: Any) -> Any:
        return np.asarray(rows, dtype=float)[:, 0] + self.offset


class CountingDoubler:
    """Doubles column `x`; each call leaves a marker file named after its first row's
    id, and the call whose rows include `gate_id` waits (bounded) for `gate` to exist,
    so a test can kill the process while that chunk is in flight."""

    def __init__(self, markers: str, gate: str, gate_id: int) -> None:
        self.markers = markers
        self.gate = gate
        self.gate_id = gate_id

    def predict(self, frame: Any) -> Any:
        ids = [int(i) for i in frame["id"]]
        Path(self.markers, f"{ids[0]}-{uuid.uuid4().hex[:8]}").touch()
        if self.gate_id in ids:
            end = time.monotonic() + 120
            while not os.path.exists(self.gate):
                if time.monotonic() > end:
                    raise TimeoutError(f"gate {self.gate} never appeared")
                time.sleep(0.01)
        return frame["x"].to_numpy() * 2


class FailsUntil:
    """Doubles column `x`, but raises until the file `ready` exists."""

    def __init__(self, ready: str) -> None:
        self.ready = ready

    def predict(self, frame: Any) -> Any:
        if not os.path.exists(self.ready):
            raise RuntimeError("not ready yet")
        return frame["x"].to_numpy() * 2


def _refuse_to_load() -> None:
    raise RuntimeError("this version cannot load here")


class Unloadable(Offset):
    """Saves fine, fails when loaded (as a version whose library is missing would)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_to_load, ())
