"""Executors: the same workflow gives the same results on threads and on processes;
executors are chosen per workflow or per task; numpy and pandas values travel between
process steps; a worker that dies fails its attempt with a retryable error."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import keel


def _append(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text + "\n")


# -- tasks (module level: pickled by reference into worker processes) ------------------------


@keel.task(name="exe_pid")
def pid() -> int:
    return os.getpid()


@keel.task(name="exe_square")
def square(x: int) -> int:
    return x * x


@keel.task(name="exe_combine")
def combine(xs: list[int], label: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "sum": sum(xs), "extra": extra, "pairs": [(x, -x) for x in xs]}


@keel.task(name="exe_fail")
def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


@keel.task(name="exe_ctx")
def where() -> dict[str, Any]:
    ctx = keel.context()
    print(f"printed by {ctx.step_key}")
    print("to stderr", file=sys.stderr)
    ctx.logger.warning("logged by %s", ctx.step_key)
    return {"run_id": ctx.run_id, "key": ctx.step_key, "attempt": ctx.attempt}


@keel.workflow(name="exe_mixed")
def mixed(n: int) -> dict[str, Any]:
    squares = square.map(range(n))
    summary = combine(squares, label="squares", extra={"n": n, "nested": [1, [2, 3]]})
    try:
        fail(n)
    except ValueError as exc:
        caught = f"{type(exc).__name__}: {exc}"
    return {"summary": summary, "caught": caught, "context": where(), "last": square(squares[-1])}


@pytest.fixture(params=["threads", "processes"])
def executor(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KEEL_EXECUTOR", request.param)
    return str(request.param)


# -- same results on both executors -------------------------------------------------------------


def _outputs(run_id: str) -> list[tuple[str, str, Any]]:
    run = keel.Client().run(run_id)
    return [(s.key, s.status, s.output() if s.has_output() else None) for s in run.steps]


def test_same_results_on_threads_and_processes(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = {}
    outputs = {}
    for name in ("threads", "processes"):
        monkeypatch.setenv("KEEL_EXECUTOR", name)
        handle = keel.run(mixed, n=4)
        results[name] = handle.result()
        outputs[name] = _outputs(handle.id)
        ctx = results[name].pop("context")
        assert ctx == {"run_id": handle.id, "key": "exe_ctx-6", "attempt": 1}
        logs = keel.Client().run(handle.id).step("exe_ctx-6").logs()
        assert "printed by exe_ctx-6" in logs
        assert "to stderr" in logs
        assert "logged by exe_ctx-6" in logs
        outputs[name] = [o for o in outputs[name] if o[0] != "exe_ctx-6"]

    assert results["threads"] == results["processes"]
    assert results["threads"] == {
        "summary": {
            "label": "squares",
            "sum": 14,
            "extra": {"n": 4, "nested": [1, [2, 3]]},
            "pairs": [(0, 0), (1, -1), (4, -4), (9, -9)],
        },
        "caught": "ValueError: bad 4",
        "last": 81,
    }
    assert outputs["threads"] == outputs["processes"]


def test_steps_run_where_the_executor_says(backend: str, executor: str) -> None:
    @keel.workflow(name="exe_where")
    def wf() -> list[int]:
        return keel.gather(pid.submit(), pid.submit())

    pids = keel.run(wf).result()
    if executor == "threads":
        assert pids == [os.getpid(), os.getpid()]
    else:
        assert os.getpid() not in pids


@keel.task(name="exe_pid_in_process", executor="processes")
def pid_in_process() -> int:
    return os.getpid()


@keel.task(name="exe_pid_in_thread", executor="threads")
def pid_in_thread() -> int:
    return os.getpid()


def test_per_task_executor_override(backend: str) -> None:
    @keel.workflow(name="exe_override_threads")
    def on_threads() -> list[int]:
        return [pid(), pid_in_process()]

    @keel.workflow(name="exe_override_processes", executor="processes")
    def on_processes() -> list[int]:
        return [pid(), pid_in_thread()]

    here = os.getpid()
    threaded, in_process = keel.run(on_threads).result()
    assert threaded == here and in_process != here
    in_process, threaded = keel.run(on_processes).result()
    assert threaded == here and in_process != here


# -- numpy and pandas between process steps ----------------------------------------------------


@keel.task(name="exe_make_array", executor="processes")
def make_array(n: int) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float64).reshape(n, 3)


@keel.task(name="exe_to_frame", executor="processes")
def to_frame(arr: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(arr, columns=["a", "b", "c"]).assign(
        label=[f"r{i}" for i in range(len(arr))]
    )


@keel.task(name="exe_summarise", executor="processes")
def summarise(df: pd.DataFrame, arr: np.ndarray) -> dict[str, Any]:
    assert isinstance(df, pd.DataFrame) and isinstance(arr, np.ndarray)
    return {
        "total": float(df[["a", "b", "c"]].to_numpy().sum()),
        "same": bool((df[["a", "b", "c"]].to_numpy() == arr).all()),
    }


@keel.workflow(name="exe_data")
def data_flow(n: int) -> dict[str, Any]:
    arr = make_array.submit(n)
    df = to_frame.submit(arr)
    return summarise(df, arr)


def test_numpy_and_pandas_flow_between_process_steps(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_INLINE_LIMIT", "128")  # some values go to the artifact store
    handle = keel.run(data_flow, n=50)
    n = 50
    assert handle.result() == {"total": float(sum(range(n * 3))), "same": True}
    run = keel.Client().run(handle.id)
    arr_step, df_step, _ = run.steps
    assert arr_step.serializer == "numpy"
    assert df_step.serializer == "parquet"
    arr = arr_step.output()
    assert arr.dtype == np.float64 and arr.shape == (n, 3)
    np.testing.assert_array_equal(arr, np.arange(n * 3, dtype=np.float64).reshape(n, 3))
    df = df_step.output()
    assert list(df.columns) == ["a", "b", "c", "label"]
    assert df["label"].tolist() == [f"r{i}" for i in range(n)]
    assert df_step.deps == [0]
    assert sorted(run.steps[2].deps) == [0, 1]


# -- worker death ------------------------------------------------------------------------------


@keel.task(name="exe_die", executor="processes")
def die(path: str) -> int:
    _append(path, f"attempt {keel.context().attempt}")
    os._exit(3)


@keel.task(name="exe_die_once", executor="processes", retries=2, retry_delay=0)
def die_once(path: str) -> int:
    attempt = keel.context().attempt
    _append(path, f"attempt {attempt}")
    if attempt == 1:
        os._exit(3)
    return attempt


@keel.workflow(name="exe_dying")
def dying(path: str, retry: bool) -> int:
    return die_once(path) if retry else die(path)


def test_worker_death_fails_the_step(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    handle = keel.run(dying, path=str(out), retry=False)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert out.read_text().splitlines() == ["attempt 1"]
    (attempt,) = run.steps[0].attempts
    assert attempt.status == "FAILED"
    assert attempt.error_type is not None and attempt.error_type.endswith("WorkerDiedError")
    assert "died" in (attempt.error_message or "")
    assert run.error_type is not None and run.error_type.endswith("WorkerDiedError")


def test_worker_death_is_retried(backend: str, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    handle = keel.run(dying, path=str(out), retry=True)
    assert handle.result() == 2
    assert out.read_text().splitlines() == ["attempt 1", "attempt 2"]
    first, second = keel.Client().run(handle.id).steps[0].attempts
    assert first.error_type is not None and first.error_type.endswith("WorkerDiedError")
    assert second.status == "SUCCEEDED"
    # The pool recovers: later process steps in a new run work.
    assert keel.run(data_flow, n=2).result()["same"] is True


# -- what cannot travel to a process --------------------------------------------------------


def test_unpicklable_input_to_a_process_step(backend: str) -> None:
    @keel.task(name="exe_consume", executor="processes")
    def consume(items: Any) -> int:
        return sum(items)

    @keel.workflow(name="exe_unpicklable")
    def wf() -> int:
        return consume(x for x in range(3))

    handle = keel.run(wf)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.SerializationError"
    assert "exe_consume-0" in (run.error_message or "")
    assert "process" in (run.error_message or "")


def test_locally_defined_task_runs_in_a_process(backend: str) -> None:
    offset = 7

    @keel.task(name="exe_closure", executor="processes")
    def shifted(x: int) -> tuple[int, int]:
        return x + offset, os.getpid()

    @keel.workflow(name="exe_closure_wf")
    def wf() -> list[int]:
        value, where = shifted(1)
        return [value, int(where != os.getpid())]

    assert keel.run(wf).result() == [8, 1]


# -- cancellation on processes -------------------------------------------------------------


@keel.task(name="exe_cancellable")
def cancellable(i: int, folder: str) -> int:
    import time

    _append(f"{folder}/ran.txt", str(i))
    if i == 0 and not os.path.exists(f"{folder}/release"):
        Path(f"{folder}/started").touch()
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{folder}/release") and time.monotonic() < deadline:
            time.sleep(0.01)
    return i * 10


@keel.workflow(name="exe_cancel_wf", executor="processes", max_concurrency=1)
def cancel_wf(n: int, folder: str) -> list[int]:
    first = cancellable.submit(0, folder)
    rest = [cancellable.submit(i, folder) for i in range(1, n)]
    keel.wait(rest, timeout=60)  # cancellation ends the queued steps
    Path(f"{folder}/release").touch()
    return keel.gather(first, rest)


def test_cancel_a_run_on_processes_then_resume(backend: str, tmp_path: Path) -> None:
    import threading
    import time

    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.setdefault("handle", keel.run(cancel_wf, n=4, folder=str(tmp_path)))
    )
    runner.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    (running,) = keel.Client().runs(workflow="exe_cancel_wf")
    keel.cancel(running.id)
    runner.join(60)
    assert not runner.is_alive()
    run = keel.Client().run(running.id)
    assert run.status == "CANCELLED"
    assert (tmp_path / "ran.txt").read_text().split() == ["0"]
    assert [(s.key, s.status) for s in run.steps] == [("exe_cancellable-0", "SUCCEEDED")]

    assert keel.resume(running.id).result() == [0, 10, 20, 30]
    assert sorted((tmp_path / "ran.txt").read_text().split()) == ["0", "1", "2", "3"]


# -- errors that cannot travel back from a worker as objects ------------------------------------


class TwoArgError(Exception):
    """Pickles, but does not unpickle: its __init__ takes other arguments than `args`."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class LockedError(Exception):
    """Does not pickle at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


@keel.task(
    name="exe_odd_error", executor="processes", retries=1, retry_delay=0, retry_on=TwoArgError
)
def odd_error(kind: str, path: str) -> str:
    attempt = keel.context().attempt
    _append(path, f"{kind} {attempt}")
    if attempt == 1:
        if kind == "two-arg":
            raise TwoArgError(42, "the detail")
        raise LockedError("holds a lock")
    return f"{kind} ok"


@keel.workflow(name="exe_odd_errors")
def odd_errors(kind: str, path: str) -> str:
    return odd_error(kind, path)


@pytest.mark.parametrize(
    ("kind", "error_type", "message", "retried"),
    [
        ("two-arg", "TwoArgError", "42: the detail", True),  # retry_on matches by type
        ("locked", "LockedError", "holds a lock", False),
    ],
)
def test_errors_that_cannot_travel_keep_their_type_and_message(
    backend: str, tmp_path: Path, kind: str, error_type: str, message: str, retried: bool
) -> None:
    out = tmp_path / "out.txt"
    run = keel.Client().run(keel.run(odd_errors, kind=kind, path=str(out)).id)
    first = run.steps[0].attempts[0]
    assert first.error_type is not None and first.error_type.endswith(error_type)
    assert first.error_message == message
    if retried:
        assert run.result() == f"{kind} ok"
        assert out.read_text().split("\n")[:2] == [f"{kind} 1", f"{kind} 2"]
    else:
        assert run.status == "FAILED"
        # The run reports the step's own error, as for errors that do travel.
        assert run.error_type == first.error_type
        assert run.error_message == message
        assert out.read_text().splitlines() == [f"{kind} 1"]


def test_a_call_knows_when_it_runs_away_from_its_coordinator() -> None:
    """What decides whether an attempt's records are committed before it reports: not
    how the value travels, but whether the attempt runs in the process that made the
    call (a spawned worker, a forked one, another host)."""
    import subprocess

    import cloudpickle

    from keel.executors.base import StepCall

    call = StepCall(
        run_id="r", seq=0, key="k-0", task="k", fn=len, args=(), kwargs={}, attempt=1,
        artifacts_url="unused", inline_limit=0,
    )  # fmt: skip
    assert call.away is False
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).away)"
    elsewhere = subprocess.run(
        [sys.executable, "-c", code], input=cloudpickle.dumps(call), capture_output=True
    )
    assert elsewhere.stdout.strip() == b"True", elsewhere.stderr
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the forked child: same memory, another process
        os.write(write, b"1" if call.away else b"0")
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 1) == b"1"
