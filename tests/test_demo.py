"""The README's first command runs examples/digits.py: it must work, and a second run
must be served from the cache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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

    second = keel.run(demo.digits)
    assert second.status == "SUCCEEDED"
    assert second.id != first.id
    assert second.result() == result
    again = keel.Client().run(second.id).steps
    assert [s.key for s in again] == [s.key for s in steps]
    assert all(s.status == "CACHED" for s in again)
    assert all(s.cached_from and s.cached_from.startswith(first.id) for s in again)


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
