"""Workflows as HTTP endpoints (keel/serving/workflow_app.py), through real uvicorn
servers on loopback: a recorded, an ephemeral and a model-loading ephemeral server,
started once per module and per store (SQLite, then PostgreSQL)."""

from __future__ import annotations

import uuid
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
import sqlalchemy as sa

import keel
from conftest import fresh_pg_schema
from flows.serving_flows import Offset, Unloadable
from keel.serving.workflow_app import create_workflow_app, jsonable
from keel.store import schema
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store
from server_support import live_server, wait_until

FLOWS = Path(__file__).parent / "flows" / "serving_flows.py"
CONCURRENT = 32


@dataclass
class Served:
    store: MetadataStore
    recorded: str  # base URLs
    ephemeral: str
    models: str


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_reason: str | None
) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp(f"served-{request.param}")
    with ExitStack() as stack:
        if request.param == "postgres":
            db_url = stack.enter_context(fresh_pg_schema(pg_reason))
        else:
            db_url = f"sqlite:///{folder / 'keel.db'}"
        store = open_store(StoreConfig(db_url=db_url, artifacts_url=str(folder / "artifacts")))
        urls = [
            stack.enter_context(live_server(create_workflow_app(ref, **options)))
            for ref, options in (
                (f"{FLOWS}:pipeline", {"store": store}),
                (f"{FLOWS}:pipeline", {"store": store, "ephemeral": True}),
                (
                    f"{FLOWS}:scored",
                    {"store": store, "ephemeral": True, "model_check_interval": 0.05},
                ),
            )
        ]
        yield Served(store, *urls)


@pytest.fixture(autouse=True)
def store_env(served: Served, keel_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Registry calls made by the test itself go to the served store."""
    monkeypatch.setenv("KEEL_DB_URL", served.store.url)
    monkeypatch.setenv("KEEL_ARTIFACTS", served.store.config.artifacts_url)


def expected(n: int, scale: float) -> dict[str, Any]:
    return {"n": n, "sum": sum(i * scale for i in range(n)), "squares": [i * i for i in range(n)]}


def row_counts(store: MetadataStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return {
            t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in schema.metadata.sorted_tables
        }


def errors_of(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code, error
    assert "Traceback" not in reply.text
    return error


# -- both modes --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["recorded", "ephemeral"])
def test_run_answers_with_the_result(served: Served, mode: str) -> None:
    reply = httpx.post(f"{getattr(served, mode)}/run", json={"n": 5, "scale": "2.5"}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["result"] == expected(5, 2.5)
    if mode == "recorded":
        run = keel.Client(store=served.store).run(body["run_id"])
        assert run.status == "SUCCEEDED" and run.workflow == "pipeline"
        assert sorted(s.task for s in run.steps) == ["scaled"] * 5 + ["total"]
    else:
        assert "run_id" not in body


@pytest.mark.parametrize("mode", ["recorded", "ephemeral"])
def test_bad_input_is_a_400_or_a_422_naming_the_parameter(served: Served, mode: str) -> None:
    url = f"{getattr(served, mode)}/run"
    error = errors_of(httpx.post(url, json={"n": "many"}, timeout=60), 422, "invalid_parameter")
    assert "'n'" in error["message"] and "int" in error["message"]
    error = errors_of(httpx.post(url, json={"scale": 2}, timeout=60), 422, "invalid_parameter")
    assert "needs parameter 'n'" in error["message"]
    error = errors_of(
        httpx.post(url, json={"n": 1, "size": 3}, timeout=60), 422, "invalid_parameter"
    )
    assert "'size'" in error["message"] and "n: int" in error["details"]["parameters"]
    json_type = {"content-type": "application/json"}
    cut = httpx.post(url, content=b'{"n": 1', headers=json_type, timeout=60)
    error = errors_of(cut, 400, "bad_json")
    assert "not valid JSON" in error["message"]
    # A body without a content type (as a no-cors fetch from any page sends) is refused.
    errors_of(httpx.post(url, content=b'{"n": 1}', timeout=60), 415, "unsupported_media_type")
    errors_of(httpx.post(url, json=[1, 2], timeout=60), 400, "bad_json")


@pytest.mark.parametrize("mode", ["recorded", "ephemeral"])
def test_a_task_that_raises_is_a_500_and_the_server_stays_up(served: Served, mode: str) -> None:
    base = getattr(served, mode)
    reply = httpx.post(f"{base}/run", json={"n": 3, "fail": True}, timeout=60)
    error = errors_of(reply, 500, "workflow_failed")
    assert error["details"]["type"] == "ValueError"
    assert "asked to fail after 3 parts" in error["message"]
    if mode == "recorded":
        assert keel.Client(store=served.store).run(error["details"]["run_id"]).status == "FAILED"
    again = httpx.post(f"{base}/run", json={"n": 3}, timeout=60)
    assert again.status_code == 200 and again.json()["result"] == expected(3, 1.0)
    assert httpx.get(f"{base}/ping", timeout=60).status_code == 200


@pytest.mark.parametrize("mode", ["recorded", "ephemeral"])
def test_concurrent_requests_each_get_their_own_result(served: Served, mode: str) -> None:
    base = getattr(served, mode)
    with httpx.Client(timeout=120) as client:

        def call(n: int) -> tuple[int, httpx.Response]:
            return n, client.post(f"{base}/run", json={"n": n, "scale": 0.5})

        with ThreadPoolExecutor(CONCURRENT) as pool:
            replies = list(pool.map(call, range(1, CONCURRENT + 1)))
    for n, reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["result"] == expected(n, 0.5)
    if mode == "recorded":
        ids = {reply.json()["run_id"] for _, reply in replies}
        assert len(ids) == CONCURRENT


def test_health_says_the_mode(served: Served) -> None:
    for base, mode in ((served.recorded, "recorded"), (served.ephemeral, "ephemeral")):
        body = httpx.get(f"{base}/health", timeout=60).json()
        assert body["status"] == "ok" and body["mode"] == mode
        assert body["workflow"] == "pipeline"
        assert httpx.get(f"{base}/ping", timeout=60).text == "ok"


# -- recorded mode -----------------------------------------------------------------------


def test_runs_starts_a_durable_run_and_answers_202_at_once(served: Served) -> None:
    reply = httpx.post(f"{served.recorded}/runs", json={"n": 4, "scale": 3}, timeout=60)
    assert reply.status_code == 202, reply.text
    run_id = reply.json()["run_id"]
    assert reply.headers["location"] == f"/api/v1/runs/{run_id}"
    assert served.store.get_run(run_id) is not None  # recorded before the answer

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{served.recorded}/runs/{run_id}", timeout=60).json()
        return body if body["status"] in ("SUCCEEDED", "FAILED") else None

    body = wait_until(finished, f"run {run_id} to finish")
    assert body["status"] == "SUCCEEDED" and body["result"] == expected(4, 3.0)
    assert keel.Client(store=served.store).run(run_id).result()["sum"] == 18.0
    errors_of(
        httpx.post(f"{served.recorded}/runs", json={"n": "x"}, timeout=60), 422, "invalid_parameter"
    )
    errors_of(httpx.get(f"{served.recorded}/runs/nope", timeout=60), 404, "run_not_found")


def test_recorded_calls_are_tracked(served: Served) -> None:
    reply = httpx.post(f"{served.recorded}/run", json={"n": 3, "log": True}, timeout=60)
    assert reply.status_code == 200, reply.text
    run = keel.Client(store=served.store).run(reply.json()["run_id"])
    assert run.step("total").data.metrics == {"parts": 3.0}


# -- ephemeral mode ----------------------------------------------------------------------


def test_ephemeral_runs_write_nothing_to_the_store(served: Served) -> None:
    before = row_counts(served.store)
    for n in range(1, 6):
        reply = httpx.post(f"{served.ephemeral}/run", json={"n": n}, timeout=60)
        assert reply.json()["result"] == expected(n, 1.0)
    failed = httpx.post(f"{served.ephemeral}/run", json={"n": 2, "fail": True}, timeout=60)
    assert failed.status_code == 500
    # A tracking call has no run to land in: refused, not written under a made-up id.
    logged = httpx.post(f"{served.ephemeral}/run", json={"n": 2, "log": True}, timeout=60)
    error = errors_of(logged, 500, "workflow_failed")
    assert error["details"]["type"] == "keel.errors.TrackingError"
    assert "runs ephemeral" in error["message"]
    assert row_counts(served.store) == before
    errors_of(
        httpx.post(f"{served.ephemeral}/runs", json={"n": 1}, timeout=60), 409, "not_recorded"
    )


def test_models_loaded_in_tasks_are_cached_and_follow_their_alias(served: Served) -> None:
    name = f"offset-{uuid.uuid4().hex[:6]}"
    first = keel.register_model(name, Offset(10.0))
    second = keel.register_model(name, Offset(1000.0))
    keel.models.set_alias(name, "live", first.version)
    uri = f"models:/{name}@live"

    def score() -> dict[str, Any]:
        reply = httpx.post(f"{served.models}/run", json={"x": 1.5, "uri": uri}, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["result"]  # type: ignore[no-any-return]

    assert score() == {"score": 11.5, "offset": 10.0}
    health = httpx.get(f"{served.models}/health", timeout=60).json()
    assert {"uri": uri, "version": first.version, "error": None} in health["models"]
    keel.models.set_alias(name, "live", second.version)
    # Every answer comes from one version or the other, never a failure; the new
    # version answers once the cache has checked the alias.
    seen = wait_until(lambda: (s := score())["offset"] == 1000.0 and s, "the alias move")
    assert seen == {"score": 1001.5, "offset": 1000.0}
    health = httpx.get(f"{served.models}/health", timeout=60).json()
    assert {"uri": uri, "version": second.version, "error": None} in health["models"]


def test_a_version_that_cannot_load_is_reported_and_the_old_one_keeps_serving(
    served: Served,
) -> None:
    name = f"broken-{uuid.uuid4().hex[:6]}"
    good = keel.register_model(name, Offset(5.0))
    bad = keel.register_model(name, Unloadable(7.0))
    fixed = keel.register_model(name, Offset(9.0))
    keel.models.set_alias(name, "live", good.version)
    uri = f"models:/{name}@live"

    def offset() -> float:
        reply = httpx.post(f"{served.models}/run", json={"x": 0.0, "uri": uri}, timeout=60)
        assert reply.status_code == 200, reply.text
        return float(reply.json()["result"]["offset"])

    def cache_entry() -> dict[str, Any]:
        models = httpx.get(f"{served.models}/health", timeout=60).json()["models"]
        [entry] = [m for m in models if m["uri"] == uri]
        return entry  # type: ignore[no-any-return]

    assert offset() == 5.0
    keel.models.set_alias(name, "live", bad.version)
    # Requests keep coming: each is answered by the loaded version while the reload fails.
    broken = wait_until(lambda: offset() == 5.0 and cache_entry()["error"], "the failed reload")
    assert f"cannot load models:/{name}/{bad.version}" in broken
    assert "this version cannot load here" in broken
    assert cache_entry()["version"] == good.version
    keel.models.set_alias(name, "live", fixed.version)
    wait_until(lambda: offset() == 9.0, "the fixed version")
    assert cache_entry() == {"uri": uri, "version": fixed.version, "error": None}


def test_results_become_json() -> None:
    frame = pd.DataFrame({"a": np.array([1, 2]), "b": ["x", "y"]})
    value = {"arr": np.arange(3), "f": np.float32(1.5), "df": frame, "s": frame["a"]}
    assert jsonable(value) == {
        "arr": [0, 1, 2],
        "f": 1.5,
        "df": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}],
        "s": [1, 2],
    }
    with pytest.raises(TypeError, match="not JSON data"):
        jsonable({"x": object()})
