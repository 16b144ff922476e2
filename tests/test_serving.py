"""`keel serve`: registered models answering MLflow's scoring protocol over real HTTP.

One server process per store (SQLite, PostgreSQL) serves `models:/digits@champion`
for the module; cases that need another model or option run a `keel.serve(...,
background=True)` server (real uvicorn on a loopback port) or their own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.models import convert_input_example_to_serving_input
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import keel
from conftest import fresh_pg_schema
from flows import serving_models
from keel.errors import ServingError
from keel.serving.batching import Batcher
from keel.serving.model_slot import Served
from keel.tracking.models import LoadedModel
from server_support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
BOUND = 60.0  # a bound on background work; reaching it is a failure, never a measure
COLUMNS = [f"p{i}" for i in range(64)]


@dataclass
class World:
    env: dict[str, str]
    url: str
    proc: subprocess.Popen[bytes]
    frame: pd.DataFrame
    arrays: np.ndarray


def _quiet_fit(model: Any, x: Any, y: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y)


def _env(home: Path, db_url: str | None) -> dict[str, str]:
    env = {"KEEL_HOME": str(home)}
    if db_url:
        env["KEEL_DB_URL"] = db_url
    return env


def server_env(world_env: dict[str, str], with_tests: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(world_env)
    paths = [str(ROOT / "src")] + ([str(ROOT / "tests")] if with_tests else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def mlflow_payload(example: Any) -> str:
    """MLflow's own serving payload for `example` (its pandas 3 deprecation muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        body = convert_input_example_to_serving_input(example)
    assert body is not None
    return body


def start_server(
    args: list[str], env: dict[str, str], port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`keel serve ARGS --port PORT` (a free one unless given), once it answers /ping."""
    port = port or free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process, in stop_server
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "serve", *args, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    LOGS[proc.pid] = log
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {server_log(proc)}")
        try:
            return httpx.get(f"{url}/ping", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, "the server to answer /ping", BOUND)
    return proc, url


LOGS: dict[int, Any] = {}


def server_log(proc: subprocess.Popen[bytes]) -> str:
    log = LOGS[proc.pid]
    log.seek(0)
    return str(log.read().decode(errors="replace"))


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    finally:
        LOGS.pop(proc.pid).close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_reason: str | None,
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serve-home")
    with ExitStack() as stack:
        db_url = None
        if request.param == "postgres":
            db_url = stack.enter_context(fresh_pg_schema(pg_reason))
        env = _env(home, db_url)
        yield from _world(env, db_url)


def _world(env: dict[str, str], db_url: str | None) -> Iterator[World]:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("KEEL_DB_URL", raising=False)
        mp.delenv("KEEL_ARTIFACTS", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        x, y = load_digits(return_X_y=True)
        frame = pd.DataFrame(x, columns=COLUMNS)
        first = _quiet_fit(LogisticRegression(max_iter=300), frame[:1000], y[:1000])
        second = _quiet_fit(LogisticRegression(C=1e-4, max_iter=50), frame[:1000], y[:1000])
        keel.register_model("digits", first, input_example=frame.head(3))
        keel.register_model("digits", second, input_example=frame.head(3))
        keel.models.set_alias("digits", "champion", 1)
        arrays = _quiet_fit(LogisticRegression(max_iter=300), x[:1000], y[:1000])
        keel.register_model("digits_arr", arrays, input_example=x[:3])
        proc, url = start_server(
            ["models:/digits@champion", "--max-batch-size", "16", "--batch-wait-ms", "2"],
            server_env(env),
        )
        try:
            yield World(env, url, proc, frame, x)
        finally:
            stop_server(proc)


@pytest.fixture(autouse=True)
def _world_env(
    request: pytest.FixtureRequest, keel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests that use the module's world see its store (not the per-test one)."""
    if "world" in request.fixturenames:
        world: World = request.getfixturevalue("world")
        for key, value in world.env.items():
            monkeypatch.setenv(key, value)


def predict(url: str, body: str | bytes, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(
        f"{url}/invocations", content=body, headers={"content-type": content_type}, timeout=BOUND
    )


def expected(uri: str, data: Any) -> list[Any]:
    return list(keel.load_model(uri).predict(data).tolist())


# -- the protocol ------------------------------------------------------------------------


def test_every_payload_format_predicts_as_load_model_does(world: World) -> None:
    rows = world.frame.iloc[1000:1012].reset_index(drop=True)
    want = expected("models:/digits/1", rows)
    split = mlflow_payload(rows)
    assert "dataframe_split" in json.loads(split)
    records = json.dumps({"dataframe_records": rows.to_dict(orient="records")})
    instances = json.dumps({"instances": rows.to_dict(orient="records")})
    columns = json.dumps({"inputs": rows.to_dict(orient="list")})
    for body in (split, records, instances, columns):
        reply = predict(world.url, body)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"predictions": want}
        assert reply.headers["x-keel-model-version"] == "1"
    csv = predict(world.url, rows.to_csv(index=False), "text/csv")
    assert csv.status_code == 200, csv.text
    assert csv.json() == {"predictions": want}


def test_a_tensor_model_takes_mlflow_inputs_and_instances(world: World) -> None:
    rows = world.arrays[1000:1010]
    want = expected("models:/digits_arr/1", rows)
    with keel.serve("models:/digits_arr/1", port=0, background=True) as server:
        body = mlflow_payload(rows)
        assert "inputs" in json.loads(body)
        for payload in (body, json.dumps({"instances": rows.tolist()})):
            reply = predict(server.url, payload)
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"predictions": want}
        wrong = predict(server.url, json.dumps({"inputs": rows[:, :10].tolist()}))
        assert wrong.status_code == 422
        assert "dimension 1" in wrong.json()["error"]["message"]


def test_64_concurrent_clients_each_get_their_own_predictions(world: World) -> None:
    data = world.frame.iloc[1000:1064].reset_index(drop=True)
    want = expected("models:/digits/1", data)

    def one(i: int) -> tuple[int, Any]:
        body = json.dumps({"dataframe_split": data.iloc[[i]].to_dict(orient="split")})
        reply = predict(world.url, body)
        return reply.status_code, reply.json()

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(one, range(64)))
    assert [status for status, _ in replies] == [200] * 64
    assert [body["predictions"] for _, body in replies] == [[w] for w in want]
    metrics = httpx.get(f"{world.url}/metrics").text
    assert 'keel_serve_requests_total{model="digits",status="200",version="1"}' in metrics
    assert "keel_serve_batch_rows_bucket" in metrics


# -- bad input ---------------------------------------------------------------------------


def error_of(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code
    assert "Traceback" not in reply.text
    return error


def test_bad_payloads_get_clear_errors(world: World) -> None:
    rows = world.frame.iloc[:2]
    missing = rows.drop(columns=["p5"])
    error = error_of(
        predict(world.url, json.dumps({"dataframe_split": missing.to_dict(orient="split")})),
        422,
        "SIGNATURE_MISMATCH",
    )
    assert "'p5' (float64)" in error["message"]
    assert error["details"]["columns"] == [{"name": "p5", "expected": "float64", "got": None}]
    mistyped = rows.astype({"p3": str})
    error = error_of(
        predict(world.url, json.dumps({"dataframe_split": mistyped.to_dict(orient="split")})),
        422,
        "SIGNATURE_MISMATCH",
    )
    assert "'p3'" in error["message"] and "float64" in error["message"]
    error_of(predict(world.url, b"{not json"), 400, "BAD_JSON")
    error_of(predict(world.url, json.dumps({"rows": [1]})), 400, "BAD_REQUEST")
    error_of(predict(world.url, json.dumps([1, 2])), 400, "BAD_REQUEST")
    error_of(predict(world.url, json.dumps({"dataframe_split": {"data": 3}})), 400, "BAD_REQUEST")
    error_of(predict(world.url, "a,b\n1", "application/xml"), 415, "UNSUPPORTED_MEDIA_TYPE")
    # Still serving afterwards.
    assert predict(world.url, json.dumps({"dataframe_records": [{}]})).status_code == 422


def test_oversized_bodies_are_refused_by_length_and_by_stream(world: World) -> None:
    with keel.serve("models:/digits/1", port=0, max_body_bytes=2000, background=True) as server:
        big = json.dumps({"dataframe_split": world.frame.iloc[:50].to_dict(orient="split")})
        error = error_of(predict(server.url, big), 413, "PAYLOAD_TOO_LARGE")
        assert error["details"]["limit"] == 2000

        def chunks() -> Iterator[bytes]:  # no Content-Length: the bytes are counted
            data = big.encode()
            for start in range(0, len(data), 500):
                yield data[start : start + 500]

        reply = httpx.post(
            f"{server.url}/invocations",
            content=chunks(),
            headers={"content-type": "application/json"},
            timeout=BOUND,
        )
        error_of(reply, 413, "PAYLOAD_TOO_LARGE")
        small = json.dumps({"dataframe_split": world.frame.iloc[:1].to_dict(orient="split")})
        assert predict(server.url, small).status_code == 200


def test_a_model_that_raises_is_a_500_and_the_server_stays_up(world: World) -> None:
    keel.register_model("raiser", serving_models.Raiser())
    with keel.serve("models:/raiser/latest", port=0, background=True) as server:
        error = error_of(
            predict(server.url, json.dumps({"inputs": [[-1.0, 2.0]]})), 500, "MODEL_ERROR"
        )
        assert error["details"] == {"type": "ValueError", "message": "a negative first feature"}
        ok = predict(server.url, json.dumps({"inputs": [[1.0, 2.0], [3.0, 4.0]]}))
        assert ok.status_code == 200 and ok.json() == {"predictions": [1, 1]}


def test_a_request_past_its_timeout_is_a_504(world: World) -> None:
    keel.register_model("slow", serving_models.Slow(2.0))
    with keel.serve("models:/slow/latest", port=0, request_timeout=0.2, background=True) as server:
        error_of(predict(server.url, json.dumps({"inputs": [[1.0]]})), 504, "TIMEOUT")
        assert httpx.get(f"{server.url}/ping").status_code == 200


# -- hot reload --------------------------------------------------------------------------


def served_version(url: str) -> int:
    return int(httpx.get(f"{url}/version", timeout=BOUND).json()["version"])


def test_moving_the_alias_under_load_switches_with_no_failed_request(world: World) -> None:
    rows = world.frame.iloc[1000:1001]
    body = json.dumps({"dataframe_split": rows.to_dict(orient="split")})
    want = {1: expected("models:/digits/1", rows), 2: expected("models:/digits/2", rows)}
    stop = threading.Event()
    seen: list[list[tuple[int, int, Any]]] = [[] for _ in range(8)]

    def client(i: int) -> None:
        with httpx.Client(timeout=BOUND) as http:
            while not stop.is_set() or not any(v == 2 for _, v, _ in seen[i][-1:]):
                reply = http.post(
                    f"{world.url}/invocations",
                    content=body,
                    headers={"content-type": "application/json"},
                )
                version = int(reply.headers.get("x-keel-model-version", 0))
                seen[i].append((reply.status_code, version, reply.json()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(seen), "every client to get a reply", BOUND)
        keel.models.set_alias("digits", "champion", 2)
        wait_until(lambda: served_version(world.url) == 2, "/version to show version 2", BOUND)
    finally:
        stop.set()
        for t in threads:
            t.join(BOUND)
    for replies in seen:
        assert all(status == 200 for status, _, _ in replies)
        versions = [v for _, v, _ in replies]
        assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
        assert all(body == {"predictions": want[v]} for _, v, body in replies)
    health = httpx.get(f"{world.url}/health").json()
    assert health["version"] == 2 and health["reloads"] >= 1 and health["last_error"] is None
    keel.models.set_alias("digits", "champion", 1)
    wait_until(lambda: served_version(world.url) == 1, "/version back at 1", BOUND)


def ghost_version(tmp_path: Path, name: str) -> int:
    """A version whose class only this test process can import: the server cannot load it."""
    (tmp_path / "ghost_model_mod.py").write_text(
        "class Ghost:\n    def predict(self, data):\n        return [0] * len(data)\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import ghost_model_mod

        return keel.register_model(name, ghost_model_mod.Ghost(), flavor="pyfunc").version
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ghost_model_mod", None)


def test_a_version_that_fails_to_load_is_reported_and_the_old_one_keeps_serving(
    world: World, tmp_path: Path
) -> None:
    from keel.store import deployments
    from keel.store.metadata import open_store

    broken = ghost_version(tmp_path, "digits")
    keel.models.set_alias("digits", "champion", broken)
    try:
        health = wait_until(
            lambda: (h := httpx.get(f"{world.url}/health").json())["last_error"] and h,
            "the failed reload in /health",
            BOUND,
        )
        assert health["version"] == 1 and "ModuleNotFoundError" in health["last_error"]
        rows = world.frame.iloc[:3]
        body = json.dumps({"dataframe_split": rows.to_dict(orient="split")})
        reply = predict(world.url, body)
        assert reply.status_code == 200 and reply.headers["x-keel-model-version"] == "1"
        (row,) = [
            d
            for d in deployments.list_deployments(open_store())
            if d.target.startswith("models:/digits@")
        ]
        assert row.version == 1 and row.last_error and "ModuleNotFoundError" in row.last_error
    finally:
        keel.models.set_alias("digits", "champion", 1)
    wait_until(
        lambda: httpx.get(f"{world.url}/health").json()["last_error"] is None,
        "the error to clear once the alias is back",
        BOUND,
    )


def test_a_pinned_uri_never_follows_the_alias(world: World) -> None:
    with keel.serve("models:/digits/1", port=0, poll_seconds=0.05, background=True) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["follows_alias"] is False and health["version"] == 1
        keel.models.set_alias("digits", "champion", 2)
        try:
            assert served_version(server.url) == 1
        finally:
            keel.models.set_alias("digits", "champion", 1)


# -- deployments -------------------------------------------------------------------------


def test_the_server_is_recorded_as_a_deployment(world: World) -> None:
    from starlette.testclient import TestClient

    from keel.server.app import create_app

    port = int(world.url.rsplit(":", 1)[1])
    ls = subprocess.run(
        [sys.executable, "-m", "keel", "deployments", "ls"],
        env=server_env(world.env),
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert ls.returncode == 0, ls.stderr
    (line,) = [x for x in ls.stdout.splitlines() if f":{port}/" in x]
    assert "models:/digits@champion" in line and "serving" in line
    with TestClient(create_app(), base_url="http://127.0.0.1") as api:
        found = api.get("/api/v1/deployments", params={"model": "digits"}).json()
    (mine,) = [d for d in found if d["port"] == port]
    assert mine["pid"] == world.proc.pid and mine["workers"] == 1
    assert mine["version"] == 1 and mine["state"] == "serving"
    assert mine["url"] == f"http://127.0.0.1:{port}/"

    from keel.store import deployments
    from keel.store.metadata import open_store

    # A server killed without marking itself stopped: its heartbeats are long gone.
    old = time.time() - 10 * deployments.STALE_AFTER
    deployments.insert(
        open_store(),
        {
            "id": "killed",
            "target": "models:/digits@champion",
            "kind": "model",
            "model": "digits",
            "version": 1,
            "host": "127.0.0.1",
            "port": 1,
            "workers": 1,
            "pid": 1,
            "machine": "gone",
            "state": "serving",
            "started_at": old,
            "heartbeat_at": old,
        },
    )
    with TestClient(create_app(), base_url="http://127.0.0.1") as api:
        (killed,) = [d for d in api.get("/api/v1/deployments").json() if d["id"] == "killed"]
    assert killed["state"] == "stale"
    deployments.mark_stopped(open_store(), "killed")

    with keel.serve("models:/digits/2", port=0, background=True) as server:
        row = deployments.get(open_store(), server.deployment_id)
        assert row is not None and (row.state, row.version, row.workers) == ("serving", 2, 1)
    row = deployments.get(open_store(), server.deployment_id)
    assert row is not None and row.state == "stopped" and row.stopped_at is not None


# -- batching ----------------------------------------------------------------------------


class Gate:
    """A model whose first call blocks until released: later requests pile up."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, data: Any) -> Any:
        self.calls.append(len(data))
        self.entered.set()
        assert self.release.wait(BOUND)
        return np.asarray(data).sum(axis=1)


class GatedRaiser(Gate):
    """A Gate that raises for any row whose first value is negative."""

    def predict(self, data: Any) -> Any:
        out = super().predict(data)
        if (np.asarray(data)[:, 0] < 0).any():
            raise ValueError("negative")
        return out


def run_batcher(
    model: Gate, batchable: bool, requests: int, first_values: list[float] | None = None
) -> list[Any]:
    served = Served(
        LoadedModel(model, flavor="pyfunc", signature=None, uri="x", meta={}),
        name="gate",
        version=1,
        batchable=batchable,
    )

    async def main() -> list[Any]:
        batcher = Batcher(lambda: served, max_rows=4, wait_ms=0)
        batcher.start()
        first = asyncio.create_task(batcher.predict(served, np.array([[0.0, 0.0]]), 1))
        await asyncio.to_thread(model.entered.wait, BOUND)
        values = first_values or [float(i) for i in range(1, requests)]
        rest = [
            asyncio.create_task(batcher.predict(served, np.array([[v, 1.0]]), 1)) for v in values
        ]
        await asyncio.sleep(0)  # let them queue behind the blocked call
        for _ in range(50):
            await asyncio.sleep(0)
        model.release.set()
        out = await asyncio.gather(first, *rest, return_exceptions=True)
        await batcher.stop()
        return [o if isinstance(o, BaseException) else o[1].tolist() for o in out]

    return asyncio.run(main())


def test_requests_queued_behind_a_busy_model_become_batches_split_back() -> None:
    model = Gate()
    out = run_batcher(model, batchable=True, requests=7)
    assert out == [[0.0]] + [[float(i) + 1.0] for i in range(1, 7)]
    assert model.calls == [1, 4, 2]  # 6 queued rows in batches of at most 4


def test_a_batch_that_raises_is_retried_per_request_so_only_the_bad_one_fails() -> None:
    model = GatedRaiser()
    out = run_batcher(model, batchable=True, requests=4, first_values=[1.0, -1.0, 2.0])
    assert out[0] == [0.0] and out[1] == [2.0] and out[3] == [3.0]
    assert isinstance(out[2], ValueError)
    assert model.calls == [1, 3, 1, 1, 1]


class ThreadRecorder:
    """Answers the sum of each row and notes the thread of every call."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def predict(self, data: Any) -> Any:
        self.threads.append(threading.get_ident())
        return np.asarray(data).sum(axis=1)


def test_a_cheap_model_is_called_on_the_event_loop_after_its_first_call() -> None:
    model = ThreadRecorder()
    served = Served(
        LoadedModel(model, flavor="pyfunc", signature=None, uri="x", meta={}),
        name="recorder",
        version=1,
        batchable=True,
    )

    async def three_requests(inline_below_s: float) -> tuple[int, list[Any]]:
        batcher = Batcher(lambda: served, max_rows=4, inline_below_s=inline_below_s)
        batcher.start()
        out = []
        for i in range(3):
            out.append((await batcher.predict(served, np.array([[1.0, float(i)]]), 1))[1].tolist())
        await batcher.stop()
        return threading.get_ident(), out

    # Every call counts as cheap: the first (cost unknown) on a thread, the rest inline.
    loop_thread, out = asyncio.run(three_requests(inline_below_s=3600.0))
    assert out == [[1.0], [2.0], [3.0]]
    assert model.threads[0] != loop_thread
    assert model.threads[1:] == [loop_thread, loop_thread]
    # None counts as cheap: every call on a worker thread.
    model.threads.clear()
    loop_thread, out = asyncio.run(three_requests(inline_below_s=0.0))
    assert out == [[1.0], [2.0], [3.0]] and len(model.threads) == 3
    assert loop_thread not in model.threads


def test_a_model_that_cannot_batch_is_called_per_request(world: World) -> None:
    model = Gate()
    out = run_batcher(model, batchable=False, requests=4)
    assert out == [[0.0]] + [[float(i) + 1.0] for i in range(1, 4)]
    assert model.calls == [1, 1, 1, 1]
    keel.register_model("one_at_a_time", serving_models.OneAtATime())
    keel.register_model("tagged", serving_models.Raiser(), tags={"keel.batchable": "false"})
    for uri in ("models:/one_at_a_time/1", "models:/tagged/1"):
        with keel.serve(uri, port=0, background=True) as server:
            assert httpx.get(f"{server.url}/health").json()["batchable"] is False


# -- processes, signals, start errors -------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish_then_exits_0(world: World) -> None:
    from keel.store import deployments
    from keel.store.metadata import open_store

    keel.register_model("slow_term", serving_models.Slow(1.0))
    proc, url = start_server(["models:/slow_term/1"], server_env(world.env))
    body = json.dumps({"inputs": [[1.0, 2.0]]})
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(predict, url, body) for _ in range(8)]

        def in_flight() -> bool:
            text = httpx.get(f"{url}/metrics").text
            return "keel_serve_in_flight 8.0" in text

        wait_until(in_flight, "8 requests in flight", BOUND)
        proc.send_signal(signal.SIGTERM)
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * 8
    assert all(r.json() == {"predictions": [3.0]} for r in replies)
    assert proc.wait(BOUND) == 0
    assert "Traceback" not in server_log(proc)
    stop_server(proc)
    (row,) = [
        d
        for d in deployments.list_deployments(open_store(), include_stopped=True)
        if d.pid == proc.pid
    ]
    assert row.state == "stopped" and row.stopped_at is not None


def test_two_worker_processes_serve_one_port(world: World) -> None:
    proc, url = start_server(["models:/digits/1", "--workers", "2"], server_env(world.env))
    try:
        children = (Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text()).split()
        workers = [
            c
            for c in children
            if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert len(workers) == 2
        rows = world.frame.iloc[1000:1016].reset_index(drop=True)
        want = expected("models:/digits/1", rows)

        def one(i: int) -> Any:
            with httpx.Client(timeout=BOUND) as http:  # a new connection each time
                body = json.dumps({"dataframe_split": rows.iloc[[i]].to_dict(orient="split")})
                reply = http.post(
                    f"{url}/invocations", content=body, headers={"content-type": "application/json"}
                )
                assert reply.status_code == 200, reply.text
                return reply.json()["predictions"][0]

        with ThreadPoolExecutor(16) as pool:
            assert list(pool.map(one, range(16))) == want
        wait_until(lambda: httpx.get(f"{url}/ping").status_code == 200, "ping", BOUND)
    finally:
        assert stop_server(proc) == 0


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", "serve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=BOUND,
    )


def test_start_errors_are_one_clear_line_and_a_documented_exit_code(
    world: World, tmp_path: Path
) -> None:
    env = server_env(world.env)
    unknown = run_cli(["models:/nope@champion", "--port", str(free_port())], env)
    assert unknown.returncode == 2 and "error: no registered model named 'nope'" in unknown.stderr
    alias = run_cli(["models:/digits@nope", "--port", str(free_port())], env)
    assert alias.returncode == 2 and "alias 'nope'" in alias.stderr
    port = int(world.url.rsplit(":", 1)[1])
    taken = run_cli(["models:/digits/1", "--port", str(port)], env)
    assert taken.returncode == 2
    assert (
        taken.stderr.splitlines()[0]
        == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    broken = ghost_version(tmp_path, "ghosts")
    unloadable = run_cli([f"models:/ghosts/{broken}", "--port", str(free_port())], env)
    assert unloadable.returncode == 1 and "ModuleNotFoundError" in unloadable.stderr
    for result in (unknown, alias, taken, unloadable):
        assert " on http://" not in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ")


def test_keel_serve_refuses_bad_options() -> None:
    with pytest.raises(ServingError, match="model URI or a workflow"):
        keel.serve("  ")
    with pytest.raises(ServingError, match="max_batch_size must be a positive number"):
        keel.serve("models:/x/1", max_batch_size=0)
    with pytest.raises(ServingError, match="background server runs one process"):
        keel.serve("models:/x/1", workers=2, background=True)


def test_csv_without_a_header_line_is_a_400(world: World) -> None:
    error = error_of(predict(world.url, b"", "text/csv"), 400, "BAD_REQUEST")
    assert "not CSV with a header line" in error["message"]


def test_an_unreachable_store_at_reload_keeps_the_loaded_version(keel_home: Path) -> None:
    """The store's database file goes away under a following slot (its pool emptied, so
    the next look-up opens a fresh, empty database): the loaded version keeps serving,
    the error is reported, and it clears once the database is back. SQLite only: a file
    can be taken away from one process; the look-up code is the same on PostgreSQL."""
    from keel.serving.model_slot import ModelSlot
    from keel.store.metadata import open_store

    keel.register_model("kept", serving_models.OneAtATime())
    keel.models.set_alias("kept", "live", 1)
    store = open_store()
    slot = ModelSlot(store, "models:/kept@live", poll_seconds=0)
    assert slot.start().version == 1
    store.engine.dispose()
    files = [keel_home / f"keel.db{suffix}" for suffix in ("", "-wal", "-shm")]
    away = keel_home / "away"
    away.mkdir()
    for file in files:  # the database with its write-ahead log
        if file.exists():
            file.rename(away / file.name)
    try:
        slot.poll_once()
        assert slot.version == 1 and slot.current is not None
        assert slot.last_error is not None and "cannot resolve models:/kept@live" in slot.last_error
        assert slot.current.predict(np.array([[1.0, 2.0]])).tolist() == [3.0]
    finally:
        store.engine.dispose()
        for file in files:
            file.unlink(missing_ok=True)
            if (away / file.name).exists():
                (away / file.name).rename(file)
    slot.poll_once()
    assert slot.last_error is None and slot.version == 1


def test_before_a_version_is_loaded_ping_health_and_invocations_answer_503(world: World) -> None:
    from starlette.testclient import TestClient

    from keel.serving.model_app import create_model_app

    app = create_model_app("models:/digits@champion")  # its startup (not run here) loads
    # The guard answers to the loopback names only (TestClient's default is `testserver`).
    client = TestClient(app, base_url="http://127.0.0.1")  # no `with`: no lifespan, no load
    assert client.get("/ping").status_code == 503
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["state"] == "loading"
    error_of(client.post("/invocations", json={"inputs": [[1.0]]}), 503, "NOT_READY")
    with TestClient(app, base_url="http://127.0.0.1") as started:  # loads in the background
        wait_until(lambda: started.get("/ping").status_code == 200, "the load", BOUND)
        assert started.get("/version").json()["version"] == 1


@pytest.mark.parametrize("mode", ["recorded", "ephemeral"])
def test_keel_serve_exposes_a_workflow(world: World, mode: str) -> None:
    """`keel serve file.py:workflow` wires the CLI to the workflow endpoint: a typed call
    answers with the result, a bad parameter is a 422, and SIGTERM exits 0."""
    from keel.store import deployments
    from keel.store.metadata import open_store

    target = f"{ROOT / 'tests' / 'flows' / 'serving_flows.py'}:pipeline"
    args = [target, *(["--ephemeral"] if mode == "ephemeral" else [])]
    proc, url = start_server(args, server_env(world.env))
    try:
        reply = httpx.post(f"{url}/run", json={"n": 3, "scale": 2}, timeout=BOUND)
        assert reply.status_code == 200, reply.text
        assert reply.json()["result"]["squares"] == [0, 1, 4]
        assert ("run_id" in reply.json()) == (mode == "recorded")
        bad = httpx.post(f"{url}/run", json={"n": "many"}, timeout=BOUND)
        assert bad.status_code == 422 and "n" in bad.text
        (row,) = [d for d in deployments.list_deployments(open_store()) if d.pid == proc.pid]
        assert row.kind == "workflow"
    finally:
        assert stop_server(proc) == 0


def test_an_onnx_version_is_served_as_it_loads(world: World) -> None:
    """keel's onnx flavor (a scikit-learn model converted at registration) answers
    /invocations with the predictions `keel.load_model` gives in-process."""
    x, y = load_digits(return_X_y=True)
    model = _quiet_fit(LogisticRegression(max_iter=300), x[:500], y[:500])
    version = keel.register_model("digits_onnx", model, flavor="onnx", input_example=x[:3])
    assert version.flavor == "onnx"
    uri = f"models:/digits_onnx/{version.version}"
    with keel.serve(uri, port=0, background=True) as served:
        reply = predict(served.url, json.dumps({"inputs": x[1000:1008].tolist()}))
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == keel.load_model(uri).predict(x[1000:1008]).tolist()
