"""Batch inference: `keel.batch_predict` inside workflows and `keel predict` on files,
on SQLite and PostgreSQL. The kill test runs `keel predict` in a real subprocess,
kills it with SIGKILL while a chunk waits on a gate file, resumes it with `keel
resume`, and counts the model's calls with marker files."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import keel
from flows.serving_flows import CountingDoubler, FailsUntil, Offset
from keel.cli.main import app
from keel.errors import DefinitionError, ParameterError

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
WAIT_SECONDS = 120.0


def frame(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"id": np.arange(rows), "x": np.arange(rows) * 1.5})


@keel.workflow
def score_table(rows: int, chunk_size: int, uri: str) -> Any:
    return keel.batch_predict(uri, frame(rows).set_index("id"), chunk_size=chunk_size)


def test_batch_predict_in_a_workflow_chunks_and_records_parquet(backend: str) -> None:
    keel.register_model("offset", Offset(100.0))
    keel.register_model("offset", Offset(200.0))
    keel.models.set_alias("offset", "live", 1)

    handle = keel.run(score_table, rows=25, chunk_size=10, uri="models:/offset@live")

    result = handle.result()
    expected = pd.DataFrame(
        {"prediction": np.arange(25) * 1.5 + 100.0}, index=pd.Index(np.arange(25), name="id")
    )
    pd.testing.assert_frame_equal(result, expected)
    run = keel.Client().run(handle.id)
    tasks = Counter(s.task for s in run.steps)
    assert tasks == {
        "batch_predict.resolve": 1,
        "batch_predict.chunk": 3,
        "batch_predict.collect": 1,
    }
    # The alias is pinned once, so every chunk used version 1.
    assert run.step("batch_predict.resolve").output() == "models:/offset/1"
    collected = run.step("batch_predict.collect")
    assert collected.serializer == "parquet"
    pd.testing.assert_frame_equal(collected.output(), expected)
    # What `keel artifacts get RUN batch_predict.collect -o FILE` writes is parquet.
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(collected.output_bytes())), expected)


def test_batch_predict_outside_a_workflow(backend: str, tmp_path: Path) -> None:
    keel.register_model("offset", Offset(1.0))
    path = tmp_path / "rows.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0]}).to_csv(path, index=False)

    predictions = keel.batch_predict("models:/offset/1", path, chunk_size=2)

    assert predictions["prediction"].tolist() == [2.0, 3.0, 4.0]
    [run] = keel.Client().runs(workflow="batch_predict")
    assert run.status == "SUCCEEDED"
    assert Counter(s.task for s in run.steps)["batch_predict.chunk"] == 2
    with pytest.raises(DefinitionError, match="in-memory data runs inside a workflow"):
        keel.batch_predict("models:/offset/1", pd.DataFrame({"x": [1.0]}))
    with pytest.raises(ParameterError, match="chunk_size"):
        keel.batch_predict("models:/offset/1", path, chunk_size=0)
    assert "batch_predict" in keel.__all__


def test_a_resume_refuses_an_input_file_that_changed(backend: str, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    keel.register_model("flaky", FailsUntil(str(ready)))
    source = tmp_path / "in.csv"
    pd.DataFrame({"x": [1.0, 2.0, 3.0]}).to_csv(source, index=False)
    from keel.serving.batch import predict_file

    failed = keel.run(predict_file, model_uri="models:/flaky/1", input_path=str(source))
    assert failed.status == "FAILED"
    ready.touch()
    original = source.read_bytes()
    source.write_bytes(original + b"4.0\n")

    keel.resume(failed.id)

    run = keel.Client().run(failed.id)
    assert run.status == "FAILED" and run.error_type == "keel.errors.InputDataError"
    assert "changed since this run started" in (run.error_message or "")
    source.write_bytes(original)  # the same rows again: the resume goes through
    assert keel.resume(failed.id).result()["prediction"].tolist() == [2.0, 4.0, 6.0]


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout + result.stderr


def test_keel_predict_writes_parquet_and_csv(backend: str, tmp_path: Path) -> None:
    keel.register_model("offset", Offset(0.5))
    keel.models.set_alias("offset", "champion", 1)
    source = tmp_path / "in.parquet"
    pd.DataFrame({"x": np.arange(7, dtype=float)}).to_parquet(source)
    for out in (tmp_path / "out.parquet", tmp_path / "out.csv"):
        code, text = cli("predict", "models:/offset@champion", source, "-o", out, "--chunk-size", 3)
        assert code == 0, text
        written = pd.read_csv(out) if out.suffix == ".csv" else pd.read_parquet(out)
        assert written["prediction"].tolist() == [i + 0.5 for i in range(7)]
    assert "SUCCEEDED" in text


def test_keel_predict_refuses_bad_input_with_exit_code_2(backend: str, tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    keel.register_model("doubler", CountingDoubler(str(markers), "", -1), input_example=frame(2))
    good = tmp_path / "in.csv"
    frame(3).to_csv(good, index=False)
    wrong = tmp_path / "wrong.csv"
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(wrong, index=False)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    cases = [
        (["models:/nosuch@champion", good], "no registered model named 'nosuch'"),
        (["models:/doubler@champion", good], "alias"),
        (["models:/doubler/1", tmp_path / "missing.csv"], "no such input file"),
        (["models:/doubler/1", garbage], "cannot read"),
        (["models:/doubler/1", tmp_path / "in.json"], "neither parquet nor CSV"),
        (["models:/doubler/1", wrong], "missing columns 'id', 'x'"),
        (["models:/doubler/1", good, "-o", tmp_path / "out.txt"], "neither parquet nor CSV"),
        (["models:/doubler/1", good, "-o", tmp_path / "no" / "out.csv"], "does not exist"),
    ]
    for args, needle in cases:
        code, text = cli("predict", *args)
        assert code == 2, (args, text)
        assert needle in text and "Traceback" not in text, (args, text)
    assert keel.Client().runs(workflow="batch_predict") == []  # refused before any run
    assert list(markers.iterdir()) == []  # and the model was never called


def keel_command(*args: str | Path, out: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # The subprocess unpickles the test's model class from tests/flows.
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    with open(out, "wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "keel", *map(str, args)], env=env, stdout=sink, stderr=sink
        )


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_keel_predict_killed_midway_resumes_without_predicting_recorded_chunks_again(
    backend: str, tmp_path: Path
) -> None:
    rows, size, gate_chunk = 120, 10, 6
    markers = tmp_path / "markers"
    markers.mkdir()
    gate = tmp_path / "gate"
    model = CountingDoubler(str(markers), str(gate), gate_chunk * size)
    keel.register_model("doubler", model)
    source = tmp_path / "in.parquet"
    frame(rows).to_parquet(source)
    target = tmp_path / "out.parquet"

    log = tmp_path / "predict.log"
    proc = keel_command(
        "predict", "models:/doubler/1", source, "-o", target, "--chunk-size", size,
        "--max-concurrency", 1, out=log,
    )  # fmt: skip

    def recorded_chunks() -> list[Any]:
        runs = keel.Client().runs(workflow="batch_predict")
        steps = runs[0].steps if runs else []
        return [s for s in steps if s.task == "batch_predict.chunk" and s.status == "SUCCEEDED"]

    # The chunks before the gated one ran one at a time; kill once their records are
    # committed, while the gated chunk is in flight.
    gate_marker = f"{gate_chunk * size}-"
    deadline = time.monotonic() + WAIT_SECONDS
    while not (
        any(p.name.startswith(gate_marker) for p in markers.iterdir())
        and len(recorded_chunks()) == gate_chunk
    ):
        assert proc.poll() is None, f"keel predict ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the gated chunk never started:\n{log.read_text()}"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    [run] = keel.Client().runs(workflow="batch_predict")
    assert run.status == "RUNNING"
    chunks = sorted(recorded_chunks(), key=lambda s: s.seq)
    first_chunk_seq = run.step("batch_predict.resolve").seq + 1
    recorded = {(s.seq - first_chunk_seq) * size for s in chunks}
    assert recorded == set(range(0, gate_chunk * size, size))
    assert not target.exists()

    gate.touch()
    resumed = keel_command("resume", run.id, out=tmp_path / "resume.log")
    assert resumed.wait(timeout=WAIT_SECONDS) == 0, (tmp_path / "resume.log").read_text()

    written = pd.read_parquet(target)
    assert written["prediction"].tolist() == [2 * 1.5 * i for i in range(rows)]
    calls = Counter(p.name.split("-")[0] for p in markers.iterdir())
    assert set(calls) == {str(i) for i in range(0, rows, size)}  # every chunk predicted
    again = sorted(first for first in recorded if calls[str(first)] != 1)
    assert not again, f"chunks recorded before the kill were predicted again: {again}"
    assert keel.Client().run(run.id).status == "SUCCEEDED"
