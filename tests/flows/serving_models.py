"""Models for tests/test_serving.py, importable by the server processes it starts
(pyfunc models are pickled by reference to this module)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class Raiser:
    """Predicts 1 per row, and raises on a row whose first value is negative."""

    def predict(self, data: Any) -> Any:
        values = np.asarray(data, dtype=float)
        if (values[:, 0] < 0).any():
            raise ValueError("a negative first feature")
        return np.ones(len(values), dtype=int)


class Slow:
    """Sleeps `seconds` per call, then predicts each row's sum: requests stay in flight."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def predict(self, data: Any) -> Any:
        time.sleep(self.seconds)
        return np.asarray(data, dtype=float).sum(axis=1)


class OneAtATime:
    """A model that declares it cannot take several requests' rows at once."""

    batchable = False

    def predict(self, data: Any) -> Any:
        return np.asarray(data, dtype=float).sum(axis=1)
