"""Workflows the REST API tests start and inspect (registered with the test app)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel

import keel


class Options(BaseModel):
    depth: int = 2
    name: str = "tree"


@keel.task
def double(x: int) -> int:
    print(f"doubling {x}")
    return 2 * x


@keel.task
def add(a: int, b: int) -> int:
    return a + b


@keel.workflow
def arith(x: int, y: int = 1) -> int:
    """Doubles two numbers and adds them."""
    return add(double.submit(x), double.submit(y))


@keel.workflow
def typed(
    count: int,
    ratio: float = 0.5,
    mode: Literal["fast", "slow"] = "fast",
    tags: list[str] | None = None,
    options: Options | None = None,
) -> dict[str, object]:
    return {"count": count, "ratio": ratio, "mode": mode}


@keel.task
def wait_for(flag: str) -> str:
    """Blocks until the file `flag` exists (bounded, so a broken test cannot hang)."""
    print(f"waiting for {flag}")
    deadline = time.monotonic() + 120
    while not Path(flag).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag} never appeared")
        time.sleep(0.02)
    return "go"


@keel.workflow
def gated(flag: str) -> int:
    """A first step, then one that waits for a file, then a last one."""
    first = double(1)
    wait_for(flag)
    return add(first, 1)


@keel.task
def outputs_table() -> pd.DataFrame:
    return pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})


@keel.task
def outputs_array() -> np.ndarray:
    return np.arange(12, dtype=np.float64).reshape(4, 3)


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


@keel.task
def outputs_object() -> Opaque:
    return Opaque(3)


@keel.task
def outputs_big() -> str:
    return "x" * 40_000


@keel.task
def outputs_nan() -> list[float]:
    return [1.0, float("nan"), float("inf")]


@keel.task
def train(epochs: int) -> dict[str, float]:
    keel.log_param("lr", 0.1)
    for i in range(epochs):
        keel.log_metric("loss", 1.0 / (i + 1), step=i)
    keel.log_metric("broken", float("nan"))
    keel.log_text("hello from train", "notes/readme.txt")
    keel.log_dict({"layers": [1, 2]}, "cfg.json")
    keel.log_table(pd.DataFrame({"k": [1, 2], "v": [0.5, 0.25]}), "tables/t.csv")
    keel.log_artifact(_png(), "plots")
    return {"acc": 0.9}


def _png() -> str:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    path = folder / "dot.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    return str(path)


@keel.workflow(experiment="server-tests")
def tracked(epochs: int = 50) -> dict[str, float]:
    """Logs params, metrics and artifacts; returns several kinds of outputs."""
    outputs_table()
    outputs_array()
    outputs_object()
    outputs_big()
    outputs_nan()
    result = train(epochs)
    keel.log_metric("final", 0.5)
    return result


@keel.task
def explode(x: int) -> int:
    raise ValueError(f"cannot handle {x}")


@keel.workflow
def failing(x: int = 7) -> int:
    double(x)
    return explode(x)


@keel.workflow
def waits_for_signal() -> object:
    return keel.wait_for_signal("go", timeout=120)


@keel.workflow
def signalled() -> int:
    """A recorded step, then a wait for the signal `go` (an int), then a last step."""
    first = double(1)
    extra = keel.wait_for_signal("go", timeout=120)
    return add(first, int(extra))
