"""The README's first command runs examples/digits.py: it must work, log the sweep's
params and metrics on its steps, register the best model as `digits@champion`, and a
second run must be served from the cache (registering nothing new)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import keel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "digits.py"


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keel_example_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_workflow_runs_then_comes_from_cache(demo: ModuleType) -> None:
    first = keel.run(demo.digits)
    assert first.status == "SUCCEEDED"
    result = first.result()
    steps = keel.Client().run(first.id).steps
    sweep = [s for s in steps if s.task == "evaluate"]
    assert len(sweep) >= 12
    assert result["configurations"] == len(sweep)
    assert result["test_accuracy"] > 0.9
    assert all(s.status == "SUCCEEDED" for s in steps)
    model = keel.Client().run(first.id).step(result["model_step"]).output()
    assert hasattr(model, "predict")

    # Each sweep step is a nested run with the configuration and its scores.
    for step in sweep:
        data, output = step.data, step.output()
        assert data.params["model"] == output["config"]["model"]
        assert data.params["C"] == str(output["config"]["C"])
        assert data.params["n_folds"] == "5"
        assert data.metrics["val_accuracy"] == pytest.approx(output["val_accuracy"])
        assert data.metrics["cv_accuracy"] == pytest.approx(output["cv_accuracy"])
        assert 0 <= data.metrics["cv_accuracy_std"] < 0.1
    run = keel.Client().run(first.id)
    assert run.step("score_test").data.metrics["test_accuracy"] == result["test_accuracy"]

    # The refitted model is registered from its step, and `champion` points at it.
    champion = keel.models.get_version("digits", "champion")
    assert champion.version == 1
    assert (champion.run_id, champion.step_key) == (first.id, result["model_step"])
    assert champion.signature is not None and "64" in str(champion.signature)
    splits = run.step("split").output()
    loaded = keel.load_model("models:/digits@champion")
    accuracy = float(np.mean(loaded.predict(splits["X_test"]) == splits["y_test"]))
    assert accuracy == pytest.approx(result["test_accuracy"])
    assert accuracy > 0.9

    second = keel.run(demo.digits)
    assert second.status == "SUCCEEDED"
    assert second.id != first.id
    assert second.result() == result
    again = keel.Client().run(second.id).steps
    assert [s.key for s in again] == [s.key for s in steps]
    assert all(s.status == "CACHED" for s in again)
    assert all(s.cached_from and s.cached_from.startswith(first.id) for s in again)
    # The same model is not registered twice: the cached `refit` step keeps version 1.
    assert [v.version for v in keel.models.list_versions("digits")] == [1]
    assert keel.models.get_version("digits", "champion").version == 1


def test_demo_registers_a_changed_model_as_a_new_version(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = demo.sweep_space()[-2:]  # a short sweep: two logistic regressions
    monkeypatch.setattr(demo, "sweep_space", lambda: configs)
    first = keel.run(demo.digits, n_folds=2)
    assert first.status == "SUCCEEDED"
    assert keel.models.get_version("digits", "champion").run_id == first.id
    # Another split trains another model: a new version, and `champion` moves to it.
    second = keel.run(demo.digits, seed=1, n_folds=2)
    assert second.status == "SUCCEEDED"
    champion = keel.models.get_version("digits", "champion")
    assert (champion.version, champion.run_id) == (2, second.id)
    assert [e.action for e in keel.models.history("digits")].count("set_alias") == 2


def test_demo_script_prints_run_id(keel_home: Path) -> None:
    env = {**os.environ, "KEEL_HOME": str(keel_home)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    runs = keel.Client().runs(workflow="digits")
    assert len(runs) == 1 and runs[0].status == "SUCCEEDED"
    assert f"run {runs[0].id}: SUCCEEDED" in proc.stdout
    assert f"keel runs show {runs[0].id}" in proc.stdout
    assert "test accuracy: 0.9" in proc.stdout
    assert "registered: digits version 1, alias 'champion'" in proc.stdout
    assert "champion loaded back: test accuracy 0.9" in proc.stdout
    assert 'keel.load_model("models:/digits@champion")' in proc.stdout


# A registration step that reads the step which returned the model (the demo's first
# design: register from `keel.Client().run(run_id).step("refit-23")` in a later step)
# fails whenever the recorder has not committed the upstream step yet: a step cannot
# read its own run's upstream steps through the Client. The demo registers inside
# `refit` instead. KEEL_FLUSH_INTERVAL=2 makes the window wide enough to hit every time.


@keel.task
def produce_value() -> int:
    return 1


@keel.task
def read_upstream(value: int, key: str) -> str:
    ctx = keel.context()
    return keel.Client(ctx.db_url).run(ctx.run_id).step(key).status


@keel.workflow
def reads_upstream() -> str:
    value = produce_value.submit()
    return read_upstream(value, value.key)


def test_a_step_reads_its_finished_upstream_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_FLUSH_INTERVAL", "2")
    handle = keel.run(reads_upstream)
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    assert handle.result() == "SUCCEEDED"
