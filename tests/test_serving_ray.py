"""`keel serve --on ray`: the model endpoint as a Ray Serve application, over real HTTP.

One local Ray (and one Serve HTTP proxy on a free loopback port) for the module. Per
store (SQLite, PostgreSQL) the module deploys `models:/digits@champion` with two
replicas from this process (`keel.serve(..., on="ray", background=True)`); the last
test deletes that application and runs `keel serve --on ray` as a subprocess that
joins the same Ray (KEEL_RAY_ADDRESS), then stops it with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from mlflow.models import convert_input_example_to_serving_input
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import keel
from conftest import fresh_pg_schema
from keel.serving.runner import ServerHandle
from server_support import free_port, wait_until
from test_serving import server_log, start_server, stop_server

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BOUND = 120.0  # a bound on background work; reaching it is a failure, never a measure
COLUMNS = [f"p{i}" for i in range(64)]

pytestmark = pytest.mark.timeout(300)


@dataclass
class World:
    env: dict[str, str]
    handle: ServerHandle
    url: str
    frame: pd.DataFrame


def _fit(model: Any, x: Any, y: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[int]:
    """One local Ray for the module; yields the port Serve's proxy will listen on."""
    if ray.is_initialized():
        ray.shutdown()
    # 4 logical CPUs: two replicas (one CPU each) with room for the CLI's replica.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield free_port()
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest,
    local_ray: int,
    tmp_path_factory: pytest.TempPathFactory,
    pg_reason: str | None,
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serve-ray-home")
    env = {"KEEL_HOME": str(home)}
    with ExitStack() as stack:
        if request.param == "postgres":
            env["KEEL_DB_URL"] = stack.enter_context(fresh_pg_schema(pg_reason))
        yield from _world(env, local_ray)


def _world(env: dict[str, str], local_ray: int) -> Iterator[World]:
    with pytest.MonkeyPatch.context() as mp:
        for key in ("KEEL_DB_URL", "KEEL_ARTIFACTS", "KEEL_RAY_ADDRESS"):
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        x, y = load_digits(return_X_y=True)
        frame = pd.DataFrame(x, columns=COLUMNS)
        first = _fit(LogisticRegression(max_iter=300), frame[:1000], y[:1000])
        second = _fit(LogisticRegression(C=1e-4, max_iter=50), frame[:1000], y[:1000])
        keel.register_model("digits", first, input_example=frame.head(3))
        keel.register_model("digits", second, input_example=frame.head(3))
        keel.models.set_alias("digits", "champion", 1)
        handle = keel.serve(
            "models:/digits@champion",
            on="ray",
            replicas=2,
            port=local_ray,
            max_batch_size=16,
            batch_wait_ms=2,
            poll_seconds=0.5,
            background=True,
        )
        assert handle is not None
        try:
            yield World(env, handle, handle.url, frame)
        finally:
            handle.stop()


@pytest.fixture(autouse=True)
def _world_env(
    request: pytest.FixtureRequest, keel_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests that use the module's world see its store (not the per-test one)."""
    if "world" in request.fixturenames:
        world: World = request.getfixturevalue("world")
        for key, value in world.env.items():
            monkeypatch.setenv(key, value)


def predict(url: str, body: str, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(
        f"{url}/invocations", content=body, headers={"content-type": content_type}, timeout=BOUND
    )


def expected(uri: str, data: Any) -> list[Any]:
    return list(keel.load_model(uri).predict(data).tolist())


def one_row(frame: pd.DataFrame, i: int) -> str:
    return json.dumps({"dataframe_split": frame.iloc[[i]].to_dict(orient="split")})


def test_predictions_equal_load_model_in_every_format(world: World) -> None:
    rows = world.frame.iloc[1000:1012].reset_index(drop=True)
    want = expected("models:/digits/1", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
        split = convert_input_example_to_serving_input(rows)
    assert split is not None and "dataframe_split" in json.loads(split)
    records = json.dumps({"dataframe_records": rows.to_dict(orient="records")})
    columns = json.dumps({"inputs": rows.to_dict(orient="list")})
    for body in (split, records, columns):
        reply = predict(world.url, body)
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"predictions": want}
        assert reply.headers["x-keel-model-version"] == "1"
    csv = predict(world.url, rows.to_csv(index=False), "text/csv")
    assert csv.status_code == 200, csv.text
    assert csv.json() == {"predictions": want}
    assert httpx.get(f"{world.url}/ping").status_code == 200
    version = httpx.get(f"{world.url}/version").json()
    assert (version["model"], version["version"]) == ("digits", 1)


def test_16_concurrent_clients_each_get_their_own_predictions(world: World) -> None:
    data = world.frame.iloc[1100:1164].reset_index(drop=True)
    want = expected("models:/digits/1", data)

    def one(i: int) -> tuple[int, Any]:
        reply = predict(world.url, one_row(data, i))
        return reply.status_code, reply.json()

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(64)))
    assert [status for status, _ in replies] == [200] * 64
    assert [body["predictions"] for _, body in replies] == [[w] for w in want]


def test_two_replicas_answer_and_the_deployment_is_recorded(world: World) -> None:
    pids: set[int] = set()

    def both() -> bool:
        health = httpx.get(f"{world.url}/health", timeout=BOUND).json()
        assert health["state"] == "serving" and health["follows_alias"] is True
        pids.add(health["pid"])
        return len(pids) == 2

    wait_until(both, "two replicas to answer /health", BOUND)
    assert os.getpid() not in pids  # replicas are Ray actors, not this process
    from keel.store import deployments
    from keel.store.metadata import open_store

    rows = deployments.list_deployments(open_store(), model="digits")
    mine = [r for r in rows if r.id == world.handle.deployment_id]
    assert len(mine) == 1
    row = mine[0]
    assert (row.kind, row.workers, row.version, row.state) == ("model-on-ray", 2, 1, "serving")
    assert f"http://{row.host}:{row.port}" == world.url


def test_bad_payloads_are_400_and_422(world: World) -> None:
    bad_json = predict(world.url, "{not json")
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["code"] == "BAD_JSON"
    no_format = predict(world.url, json.dumps({"rows": [[1, 2]]}))
    assert no_format.status_code == 400
    assert no_format.json()["error"]["code"] == "BAD_REQUEST"
    missing = world.frame.iloc[:2].drop(columns=["p7"])
    reply = predict(world.url, json.dumps({"dataframe_split": missing.to_dict(orient="split")}))
    assert reply.status_code == 422, reply.text
    error = reply.json()["error"]
    assert error["code"] == "SIGNATURE_MISMATCH" and "p7" in error["message"]
    assert {"name": "p7", "expected": "float64", "got": None} in error["details"]["columns"]
    assert httpx.get(f"{world.url}/nowhere").status_code == 404


def test_moving_the_alias_switches_every_replica_with_no_failed_request(world: World) -> None:
    data = world.frame.iloc[1200:1232].reset_index(drop=True)
    wants = {
        "1": expected("models:/digits/1", data),
        "2": expected("models:/digits/2", data),
    }
    assert wants["1"] != wants["2"]  # the versions are told apart by their answers
    stop = threading.Event()
    failures: list[str] = []
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            reply = predict(world.url, one_row(data, i % len(data)))
            with lock:
                version = reply.headers.get("x-keel-model-version", "")
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code}: {reply.text}")
                elif reply.json()["predictions"] != [wants[version][i % len(data)]]:
                    failures.append(f"version {version} answered row {i} wrongly")
                seen[version] = seen.get(version, 0) + 1
            i += 4

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: seen.get("1", 0) >= 8, "requests served by version 1", BOUND)
        keel.models.set_alias("digits", "champion", 2)
        versions: dict[int, int] = {}

        def all_moved() -> bool:
            health = httpx.get(f"{world.url}/health", timeout=BOUND).json()
            versions[health["pid"]] = health["version"]
            return len(versions) == 2 and set(versions.values()) == {2}

        wait_until(all_moved, "both replicas to serve version 2", BOUND)
        wait_until(lambda: seen.get("2", 0) >= 8, "requests served by version 2", BOUND)
    finally:
        stop.set()
        for t in threads:
            t.join(BOUND)
    assert failures == []
    assert httpx.get(f"{world.url}/version").json()["version"] == 2


def test_a_second_model_on_the_same_route_is_refused_clearly(world: World) -> None:
    from keel.errors import ServingError
    from keel.store import deployments
    from keel.store.metadata import open_store

    before = {a for a in serve.status().applications if a.startswith("keel-")}
    with pytest.raises(ServingError, match="did not deploy") as caught:
        keel.serve("models:/digits/1", on="ray", background=True)
    assert caught.value.hint is not None and "route prefix" in caught.value.hint
    assert {a for a in serve.status().applications if a.startswith("keel-")} == before
    rows = deployments.list_deployments(open_store(), model="digits", include_stopped=True)
    refused = [r for r in rows if r.id != world.handle.deployment_id]
    assert [r.state for r in refused] == ["stopped"]
    assert httpx.get(f"{world.url}/ping").status_code == 200  # the first one still serves


def _server_env(world: World) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEL_", "RAY_ADDRESS"))}
    env.update(world.env)
    env["KEEL_RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def test_cli_start_errors_on_ray_are_one_line_and_exit_2(world: World) -> None:
    """Checked before anything is deployed: the model first, then the options."""
    env = {k: v for k, v in _server_env(world).items() if k != "KEEL_RAY_ADDRESS"}
    cases = {
        "no registered model named 'nope'": ["models:/nope@champion", "--on", "ray"],
        "alias 'nope'": ["models:/digits@nope", "--on", "ray"],
        "options of --on ray": ["models:/digits@champion", "--replicas", "2"],
        "must be a JSON object": ["models:/digits@champion", "--on", "ray", "--autoscaling", "[1]"],
    }
    for message, args in cases.items():
        result = subprocess.run(
            [sys.executable, "-m", "keel", "serve", *args, "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert " on http://" not in result.stderr and "Traceback" not in result.stderr


def test_cli_serves_on_ray_and_sigterm_deletes_the_app_and_exits_0(world: World) -> None:
    """Runs last for its store: the route / is the module app's until it is deleted."""
    world.handle.stop()
    port = int(world.url.rsplit(":", 1)[1])
    args = ["models:/digits@champion", "--on", "ray", "--replicas", "1"]
    proc, _ = start_server(args, _server_env(world), port=port)
    try:
        wait_until(
            lambda: "on http://" in server_log(proc), "keel serve to say where it serves", BOUND
        )
        rows = world.frame.iloc[1300:1305].reset_index(drop=True)
        reply = predict(world.url, json.dumps({"dataframe_split": rows.to_dict(orient="split")}))
        assert reply.status_code == 200, reply.text
        version = reply.headers["x-keel-model-version"]
        assert reply.json() == {"predictions": expected(f"models:/digits/{version}", rows)}
        ours = [a for a in serve.status().applications if a.startswith("keel-")]
        assert len(ours) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(BOUND) == 0, server_log(proc)
        assert "keel serve: stopped" in server_log(proc)
        assert not [a for a in serve.status().applications if a.startswith("keel-")]
        from keel.store import deployments
        from keel.store.metadata import open_store

        rows_after = deployments.list_deployments(open_store(), include_stopped=True)
        cli = [r for r in rows_after if r.pid == proc.pid]
        assert [(r.kind, r.workers, r.state) for r in cli] == [("model-on-ray", 1, "stopped")]
    finally:
        stop_server(proc)


def test_bad_scale_options_are_clear_errors() -> None:
    from keel.errors import ServingError
    from keel.serving.on_ray import RayServeOptions

    auto = RayServeOptions.of(autoscaling='{"min_replicas": 1, "max_replicas": 3}')
    assert auto.deployment_options() == {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}
    }
    assert RayServeOptions.of(min_replicas=0, max_replicas=2).deployment_options() == {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 2}
    }
    assert RayServeOptions.of(replicas=3).deployment_options() == {"num_replicas": 3}
    cases = {
        "not valid JSON": {"autoscaling": "{min"},
        "must be a JSON object": {"autoscaling": "[1]"},
        "not both": {"replicas": 2, "max_replicas": 3},
        "more than max_replicas": {"min_replicas": 4, "max_replicas": 2},
        "at least 1": {"replicas": 0},
    }
    for message, kwargs in cases.items():
        with pytest.raises(ServingError, match=message):
            RayServeOptions.of(**kwargs)
    with pytest.raises(ServingError, match="options of --on ray"):
        keel.serve("models:/digits@champion", replicas=2)
    with pytest.raises(ServingError, match="serves model URIs"):
        keel.serve("flows.py:search", on="ray")
    with pytest.raises(ServingError, match="'local' or 'ray'"):
        keel.serve("models:/digits@champion", on="k8s")
    # Ray Serve's proxy runs no keel guard: beyond loopback only when told it is safe.
    with pytest.raises(ServingError, match="does not check keel's API tokens"):
        keel.serve("models:/digits@champion", on="ray", host="0.0.0.0")
    with pytest.raises(ServingError, match="not available with --on ray"):
        keel.serve("models:/digits@champion", on="ray", log_requests=True)
