"""The inference log (`keel serve --log-requests`) and each deployment's traffic.

One `keel serve --log-requests` process per store (SQLite, PostgreSQL) serves
`models:/digits/1` for the module; the sample-rate and slow-store cases run their own
`keel.serve(..., background=True)` servers (real uvicorn on a loopback port), whose
`stop()` flushes the log, so counts read after it are final.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pandas as pd
import pytest
import sqlalchemy as sa
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

import keel
from conftest import fresh_pg_schema
from keel.errors import ModelNotFoundError, ServingError
from keel.store import inference_log
from keel.store.metadata import open_store
from server_support import wait_until
from test_serving import _env, server_env, start_server, stop_server

BOUND = 60.0  # a bound on background work; reaching it is a failure, never a measure
COLUMNS = [f"p{i}" for i in range(64)]


@dataclass
class World:
    env: dict[str, str]
    db_url: str | None
    url: str
    proc: subprocess.Popen[bytes]
    frame: pd.DataFrame


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def world(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_reason: str | None,
) -> Iterator[World]:
    home = tmp_path_factory.mktemp("serve-log-home")
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(max_iter=300).fit(frame[:1000], y[:1000])
        keel.register_model("digits", model, input_example=frame.head(3))
        proc, url = start_server(["models:/digits/1", "--log-requests"], server_env(env))
        try:
            yield World(env, db_url, url, proc, frame)
        finally:
            stop_server(proc)


@pytest.fixture(autouse=True)
def _world_env(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here sees the module's store (not the per-test one)."""
    for key, value in world.env.items():
        monkeypatch.setenv(key, value)


def split(frame: pd.DataFrame) -> dict[str, Any]:
    return {"dataframe_split": frame.to_dict(orient="split", index=False)}


def post(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json=body, timeout=BOUND)


def logged(version: int | None = 1) -> int:
    return inference_log.count(open_store(), "digits", version)


def test_every_request_is_logged_with_its_inputs_and_predictions(world: World) -> None:
    before = logged()
    sent = []
    for i in range(12):  # 1 to 3 rows each, from distinct rows of the data
        part = world.frame.iloc[i * 3 : i * 3 + 1 + i % 3]
        reply = post(world.url, split(part))
        assert reply.status_code == 200
        sent.append((part, reply.json()["predictions"]))
    bad = post(world.url, split(world.frame.head(1).drop(columns=["p5"])))
    assert bad.status_code == 422
    wait_until(lambda: logged() == before + 13, "13 requests to be logged", BOUND)

    log = keel.inference_log("digits", version=1).tail(sum(len(p) for p, _ in sent) + 1)
    assert list(log.columns) == [
        "time",
        "version",
        "latency_ms",
        "status",
        "request_id",
        *COLUMNS,
        "predictions",
        "truncated",
    ]
    ok, failed = log.iloc[:-1], log.iloc[-1]
    assert (ok["status"] == 200).all() and (ok["version"] == 1).all()
    assert (ok["latency_ms"] > 0).all() and not ok["truncated"].any()
    expected = pd.concat([p for p, _ in sent], ignore_index=True)
    pd.testing.assert_frame_equal(
        ok[COLUMNS].reset_index(drop=True).astype(float), expected, check_dtype=False
    )
    assert list(ok["predictions"]) == [y for _, ys in sent for y in ys]
    # one request_id per request, its rows together
    sizes = ok.groupby("request_id", sort=True).size().tolist()
    assert sizes == [len(p) for p, _ in sent]
    assert failed["status"] == 422 and pd.isna(failed["predictions"])
    assert pd.isna(failed["p5"])  # rejected before it was parsed: no inputs


def test_inputs_over_the_size_cap_are_left_out_and_marked(world: World) -> None:
    big = world.frame.head(600)  # JSON of 600 x 64 numbers: well over MAX_JSON_CHARS
    assert len(big.to_json(orient="split", index=False)) > inference_log.MAX_JSON_CHARS
    before = logged()
    assert post(world.url, split(big)).status_code == 200
    wait_until(lambda: logged() == before + 1, "the big request to be logged", BOUND)
    (row,) = inference_log.select(open_store(), "digits", 1, limit=1, newest_first=True)
    assert row.truncated and row.inputs is None and row.predictions is not None


def test_rest_pages_the_log_newest_first(world: World) -> None:
    from starlette.testclient import TestClient

    from keel.server.app import create_app
    from keel.server.routes.common import encode_cursor

    total = logged() + 3
    for i in range(3):
        assert post(world.url, split(world.frame.iloc[[i]])).status_code == 200
    wait_until(lambda: logged() == total, "the requests to be logged", BOUND)
    seen: list[int] = []
    cursor = None
    with TestClient(create_app(), base_url="http://127.0.0.1") as api:
        while True:
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = api.get("/api/v1/models/digits/versions/1/inferences", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            seen += [e["id"] for e in body["inferences"]]
            assert all(e["version"] == 1 for e in body["inferences"])
            cursor = body["next_cursor"]
            if cursor is None:
                break
        newest = api.get("/api/v1/models/digits/versions/1/inferences?limit=1").json()
        unknown = api.get("/api/v1/models/nope/versions/1/inferences")
        bad_cursor = api.get("/api/v1/models/digits/versions/1/inferences?cursor=zz")
        huge = encode_cursor(2**70)  # well-formed, but past any id the database holds
        huge_cursor = api.get(f"/api/v1/models/digits/versions/1/inferences?cursor={huge}")
    assert len(seen) == total and seen == sorted(seen, reverse=True)
    (entry,) = newest["inferences"]
    assert entry["inputs"]["columns"] == COLUMNS and entry["status"] == 200
    assert unknown.status_code == 404 and bad_cursor.status_code == 400
    assert huge_cursor.status_code == 400


def test_sample_rate_0_logs_none_and_a_half_logs_about_half(world: World) -> None:
    counts = {}
    for rate in (0.0, 0.5):
        with keel.serve(
            "models:/digits/1", port=0, background=True, log_requests=True, log_sample_rate=rate
        ) as server:
            for i in range(200):
                assert post(server.url, split(world.frame.iloc[[i]])).status_code == 200
        rows = inference_log.select(open_store(), "digits", 1)
        counts[rate] = sum(1 for r in rows if r.deployment_id == server.deployment_id)
    assert counts[0.0] == 0
    # Binomial(200, 0.5) falls outside 60..140 with a probability below 1e-8.
    assert 60 <= counts[0.5] <= 140


def _lock_store(world: World) -> Any:
    """Hold a lock that stops the log's writes until released (the store 'gone')."""
    store = open_store()
    if world.db_url is None:
        path = store.engine.url.database
        assert path is not None
        conn = sqlite3.connect(path, timeout=BOUND, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        return conn
    conn = sa.create_engine(world.db_url).connect()
    conn.execute(sa.text("LOCK TABLE keel_inference_log IN ACCESS EXCLUSIVE MODE"))
    return conn


def test_a_locked_store_never_blocks_requests_and_drops_are_counted(world: World) -> None:
    sent = 40
    server = keel.serve(
        "models:/digits/1", port=0, background=True, log_requests=True, log_queue_size=4
    )
    assert server is not None
    lock = _lock_store(world)
    try:
        for i in range(sent):
            reply = post(server.url, split(world.frame.iloc[[i]]))
            assert reply.status_code == 200
        health = httpx.get(f"{server.url}/health", timeout=BOUND).json()["inference_log"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=BOUND).text
    finally:
        if world.db_url is None:
            lock.execute("ROLLBACK")
            lock.close()
        else:
            lock.rollback()
            lock.close()
            lock.engine.dispose()
    server.stop()  # writes what is still queued, now that the lock is gone
    # The queue holds 4, the writer at most the batch it is stuck on: the rest dropped.
    assert health["dropped"] > 0 and health["written"] == 0
    dropped = re.search(r"^keel_serve_log_dropped_total (\S+)$", metrics, re.M)
    assert dropped is not None and float(dropped.group(1)) == health["dropped"]
    rows = inference_log.select(open_store(), "digits", 1)
    mine = sum(1 for r in rows if r.deployment_id == server.deployment_id)
    assert mine + health["dropped"] == sent  # each request either written or dropped


@keel.workflow
def next_training_set(model: str, version: int) -> dict[str, Any]:
    """A workflow that builds a labelled dataset from what the model served."""
    log = keel.inference_log(model, version=version)
    served = log[(log["status"] == 200) & ~log["truncated"]]
    data = served[COLUMNS].astype(float)
    labels = served["predictions"].astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refit = LogisticRegression(max_iter=50).fit(data, labels)
    return {"rows": len(data), "classes": sorted(int(c) for c in refit.classes_)}


def test_a_workflow_builds_a_training_set_from_the_log(world: World) -> None:
    before = logged()
    for i in range(0, 40, 4):
        assert post(world.url, split(world.frame.iloc[i : i + 4])).status_code == 200
    wait_until(lambda: logged() == before + 10, "the requests to be logged", BOUND)
    log = keel.inference_log("digits", version=1)
    served = log[(log["status"] == 200) & ~log["truncated"]]
    result = keel.run(next_training_set, model="digits", version=1).result()
    assert result["rows"] == len(served) >= 40
    assert result["classes"] == sorted({int(p) for p in served["predictions"]})


def test_reading_the_log_checks_its_arguments(world: World) -> None:
    with pytest.raises(ModelNotFoundError):
        keel.inference_log("no-such-model")
    with pytest.raises(ModelNotFoundError):
        keel.inference_log("digits", version=99)
    with pytest.raises(ServingError, match="limit"):
        keel.inference_log("digits", limit=0)
    with pytest.raises(ServingError, match="since"):
        keel.inference_log("digits", since="yesterday")  # type: ignore[arg-type]
    with pytest.raises(ServingError, match="log_sample_rate"):
        keel.serve("models:/digits/1", port=0, background=True, log_sample_rate=1.5)
    assert "inference_log" in keel.__all__
    recent = keel.inference_log("digits", version="latest", limit=1)
    assert recent["request_id"].nunique() == 1
    future = keel.inference_log("digits", since=4102444800.0)  # 2100-01-01
    assert len(future) == 0 and "predictions" in future.columns


def test_the_deployment_row_carries_rate_latency_and_errors(world: World) -> None:
    from starlette.testclient import TestClient

    from keel.server.app import create_app

    port = int(world.url.rsplit(":", 1)[1])

    def mine() -> dict[str, Any]:
        with TestClient(create_app(), base_url="http://127.0.0.1") as api:
            found = api.get("/api/v1/deployments", params={"model": "digits"}).json()
        (row,) = [d for d in found if d["port"] == port]
        return dict(row)

    before = mine()
    assert post(world.url, split(world.frame.head(2))).status_code == 200
    assert post(world.url, split(world.frame.head(1).drop(columns=["p1"]))).status_code == 422
    counted = (before["requests"] or 0) + 2
    row = wait_until(
        lambda: (r := mine())["requests"] is not None and r["requests"] >= counted and r,
        "a heartbeat with this test's requests",
        BOUND,
    )
    assert row["errors"] >= (before["errors"] or 0) + 1
    assert row["rate"] > 0 and 0 < row["p50_ms"] <= row["p95_ms"]
    ls = subprocess.run(
        [sys.executable, "-m", "keel", "deployments", "ls"],
        env=server_env(world.env),
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert ls.returncode == 0, ls.stderr
    assert "REQ/S" in ls.stdout and "P95" in ls.stdout
    (line,) = [x for x in ls.stdout.splitlines() if f":{port}/" in x]
    assert re.search(r"\d+\.\d+ms", line) and re.search(r"\d+/\d+", line)


def test_log_options_need_a_model_target_and_a_rate_in_0_to_1(world: World) -> None:
    with pytest.raises(ServingError, match="inference log"):
        keel.serve("flows.py:search", port=0, background=True, log_requests=True)
    cli = subprocess.run(
        [sys.executable, "-m", "keel", "serve", "models:/digits/1", "--log-sample-rate", "2"],
        env=server_env(world.env),
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert cli.returncode == 2 and "--log-sample-rate" in cli.stderr


def test_the_rate_counts_the_last_minute_not_the_last_heartbeat() -> None:
    from keel.serving.traffic import Traffic

    traffic = Traffic()
    for error in (False, False, True):
        traffic.observe(0.004, error)
    first, second = traffic.snapshot(), traffic.snapshot()
    # A heartbeat after a quiet spell still reports the minute's requests (a rate that
    # compared totals with the previous heartbeat said 0 here).
    assert first["rate"] > 0 and second["rate"] > 0
    assert (second["requests"], second["errors"]) == (3, 1)
    assert second["p50_ms"] == second["p95_ms"] == 4.0
