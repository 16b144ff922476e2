"""Workflows for the browser tests of the web UI (tests/test_ui.py).

The server under test registers this file (`keel server --workflows`), so the
launch page can start `ui_launch`; the tests also run the others from Python into
the same store.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import pandas as pd

import keel


@keel.task
def prepare(rows: int) -> pd.DataFrame:
    print(f"preparing {rows} rows")
    return pd.DataFrame({"x": list(range(rows)), "y": [i * i for i in range(rows)]})


@keel.task
def train(data: pd.DataFrame, epochs: int, lr: float) -> dict[str, float]:
    from matplotlib.figure import Figure

    loss = 1.0
    losses = []
    for epoch in range(epochs):
        loss *= 1 - lr
        losses.append(loss)
        keel.log_metric("loss", loss, step=epoch)
        keel.log_metric("accuracy", 1 - loss / 2, step=epoch)
        print(f"epoch {epoch}: loss {loss:.4f}")
    keel.log_param("optimizer", "sgd")
    figure = Figure(figsize=(3, 2), dpi=60)
    figure.subplots().plot(losses)
    keel.log_figure(figure, "plots/loss.png")
    keel.log_dict({"epochs": epochs, "lr": lr}, "config.json")
    return {"loss": loss, "rows": float(len(data))}


@keel.task
def report(metrics: dict[str, float]) -> str:
    return f"final loss {metrics['loss']:.4f}"


@keel.workflow(tags={"team": "ui"})
def ui_train(epochs: int = 6, lr: float = 0.2, rows: int = 5) -> str:
    """Prepare a table, train for some epochs (logging loss and accuracy), report."""
    data = prepare.submit(rows)  # futures passed on are the graph's edges
    metrics = train.submit(data, epochs, lr)
    summary = report.submit(metrics)
    keel.log_metric("final_loss", metrics.result()["loss"])
    return summary.result()


@keel.task
def explode(x: int) -> int:
    raise ValueError(f"cannot handle {x}")


@keel.workflow
def ui_broken(x: int = 3) -> int:
    """A step that fails: the run is FAILED."""
    return explode(x)


@keel.task
def gate(i: int, flag: str) -> int:
    """Waits until the file `flag` exists (bounded, so a broken test cannot hang)."""
    print(f"part {i} waiting", flush=True)
    deadline = time.monotonic() + 120
    while not Path(flag).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{flag} never appeared")
        time.sleep(0.02)
    print(f"part {i} through", flush=True)
    return i


@keel.task
def total(parts: list[int]) -> int:
    return sum(parts)


@keel.workflow
def ui_gated(flag: str, n: int = 3) -> int:
    """`n` steps side by side that wait for a file, then their sum."""
    return total(gate.map(range(n), flag=flag))


@keel.workflow
def ui_launch(
    count: int,
    ratio: float = 0.5,
    mode: Literal["fast", "slow"] = "fast",
    note: str = "",
) -> dict[str, object]:
    """Typed parameters for the launch form."""
    return {"count": count, "ratio": ratio, "mode": mode, "note": note}


@keel.task
def fit(data: pd.DataFrame) -> object:
    """Fit a line to the table and register it (the version's lineage is this step)."""
    from sklearn.linear_model import LinearRegression

    model = LinearRegression().fit(data[["x"]], data["y"])
    keel.log_metric("r2", float(model.score(data[["x"]], data["y"])))
    version = keel.register_model("ui_model", model, description="a line through y = x^2")
    keel.models.set_alias("ui_model", "champion", version.version)
    return model


@keel.workflow
def ui_register(rows: int = 8) -> str:
    """Prepare a table, fit a model on it and register the model."""
    fit(prepare.submit(rows))
    return "registered"
