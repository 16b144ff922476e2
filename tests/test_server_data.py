"""REST API over recorded data: step outputs and logged files (download, preview, no
unpickling, no path traversal), params and metrics (downsampled histories),
experiments, the model registry (aliases by admins) and webhook triggers."""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi import FastAPI
from sklearn.linear_model import LogisticRegression
from starlette.testclient import TestClient

import keel
from keel.server.routes.metrics import downsample
from keel.store.metadata import open_store
from server_support import assert_error, client, launch, tokens, wait_status


@pytest.fixture
def tracked(api: TestClient) -> str:
    run = launch(api, "tracked", params={"epochs": 50})
    done = wait_status(api, run["id"], "SUCCEEDED", "FAILED")
    assert done["status"] == "SUCCEEDED", done
    return str(run["id"])


# -- step outputs ----------------------------------------------------------------------------


def test_output_previews_by_serializer(api: TestClient, tracked: str) -> None:
    base = f"/api/v1/runs/{tracked}/steps"
    table = api.get(f"{base}/outputs_table/output/preview").json()
    assert table["kind"] == "table" and table["columns"] == ["a", "b"]
    assert table["rows"] == [[1, "x"], [2, "y"], [3, "z"]] and table["total_rows"] == 3
    array = api.get(f"{base}/outputs_array/output/preview").json()
    assert array["kind"] == "array" and array["shape"] == [4, 3] and array["dtype"] == "float64"
    assert array["json_value"][1] == [3.0, 4.0, 5.0]
    nan = api.get(f"{base}/outputs_nan/output/preview")
    assert nan.json()["json_value"] == [1.0, "NaN", "Infinity"]
    json.loads(nan.text)  # strict JSON
    big = api.get(f"{base}/outputs_big/output/preview").json()
    assert big["kind"] == "text" and big["text"] == "x" * 40_000
    meta = api.get(f"{base}/outputs_table/output").json()
    assert meta["serializer"] == "parquet" and meta["type"].endswith("DataFrame")
    assert meta["content_url"].endswith("/output/content")


def test_output_downloads_are_the_recorded_bytes(api: TestClient, tracked: str) -> None:
    base = f"/api/v1/runs/{tracked}/steps"
    reply = api.get(f"{base}/outputs_array/output/content")
    assert reply.status_code == 200
    assert reply.headers["content-disposition"].endswith('.npy"')
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert np.load(__import__("io").BytesIO(reply.content)).shape == (4, 3)
    parquet = api.get(f"{base}/outputs_table/output/content")
    frame = pd.read_parquet(__import__("io").BytesIO(parquet.content))
    assert list(frame["a"]) == [1, 2, 3]
    meta = api.get(f"{base}/outputs_big/output").json()
    assert meta["stored"] == "artifact"
    blob = api.get(f"/api/v1/artifacts/{meta['hash']}").json()
    assert blob["what"] == "value" and blob["run_id"] == tracked
    content = api.get(f"/api/v1/artifacts/{meta['hash']}/content").content
    assert content == api.get(f"{base}/outputs_big/output/content").content
    assert json.loads(content) == "x" * 40_000
    result = api.get(f"/api/v1/runs/{tracked}/result").json()
    assert result["serializer"] == "json" and result["stored"] == "inline"
    assert json.loads(api.get(f"/api/v1/runs/{tracked}/result/content").content) == {"acc": 0.9}


def test_pickled_outputs_are_offered_as_bytes_never_loaded(
    api: TestClient, tracked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the server unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    base = f"/api/v1/runs/{tracked}/steps/outputs_object/output"
    assert api.get(base).json()["serializer"] == "cloudpickle"
    preview = api.get(f"{base}/preview").json()
    assert preview["kind"] == "binary" and "never loaded" in preview["note"]
    download = api.get(f"{base}/content")
    assert download.status_code == 200 and download.headers["content-disposition"].endswith('.pkl"')
    assert download.headers["content-type"] == "application/octet-stream"
    monkeypatch.undo()
    assert pickle.loads(download.content).value == 3


def test_steps_without_output(api: TestClient) -> None:
    run = launch(api, "failing", params={"x": 1})
    wait_status(api, run["id"], "FAILED")
    err = assert_error(api.get(f"/api/v1/runs/{run['id']}/steps/explode/output"), 404)
    assert "no recorded output" in err["message"]
    assert_error(api.get(f"/api/v1/runs/{run['id']}/steps/explode/output/content"), 404)


# -- logged files ---------------------------------------------------------------------------------


def test_logged_artifacts_list_download_and_preview(api: TestClient, tracked: str) -> None:
    assert api.get(f"/api/v1/runs/{tracked}/artifacts").json() == []
    listed = api.get(f"/api/v1/runs/{tracked}/artifacts", params={"step": "train"}).json()
    paths = [a["path"] for a in listed]
    assert paths == ["cfg.json", "notes/readme.txt", "plots/dot.png", "tables/t.csv"]
    assert len(api.get(f"/api/v1/runs/{tracked}/artifacts?all_steps=true").json()) == 4
    by_path = {a["path"]: a for a in listed}
    text = api.get(by_path["notes/readme.txt"]["content_url"])
    assert text.content == b"hello from train"
    assert text.headers["content-disposition"] == 'attachment; filename="readme.txt"'
    assert "sandbox" in text.headers["content-security-policy"]
    preview = api.get(by_path["notes/readme.txt"]["preview_url"]).json()
    assert preview == {**preview, "kind": "text", "text": "hello from train"}
    png = api.get(by_path["plots/dot.png"]["preview_url"]).json()
    assert png["kind"] == "image" and png["media_type"] == "image/png"
    assert base64.b64decode(png["data_base64"]).startswith(b"\x89PNG")
    csv = api.get(by_path["tables/t.csv"]["preview_url"]).json()
    assert (
        csv["kind"] == "table" and csv["columns"] == ["k", "v"] and csv["rows"][1] == ["2", "0.25"]
    )
    cfg = api.get(by_path["cfg.json"]["preview_url"]).json()
    assert cfg["kind"] == "json" and cfg["json_value"] == {"layers": [1, 2]}
    blob = api.get(f"/api/v1/artifacts/{by_path['cfg.json']['hash']}").json()
    assert blob["what"] == "logged" and blob["size"] == by_path["cfg.json"]["size"]


def test_downloads_cannot_leave_the_artifact_store(api: TestClient, tracked: str) -> None:
    store = open_store()
    # A real file of the artifact store that no record names is not served either.
    secret = b"not recorded"
    digest = hashlib.sha256(secret).hexdigest()
    from keel.store.artifacts import artifact_store

    artifact_store(store.config.artifacts_url).put(digest, secret)
    assert_error(api.get(f"/api/v1/artifacts/{digest}/content"), 404)

    base = f"/api/v1/runs/{tracked}/artifacts/content"
    for path in (
        "../../keel.db",
        "notes/../../../keel.db",
        "/etc/passwd",
        "notes/readme.txt/..",
        "notes%2F..%2F..%2Fkeel.db",
        "..\\..\\keel.db",
        "./notes/readme.txt",
    ):
        for step in (None, "train"):
            params = {"path": path} | ({"step": step} if step else {})
            assert_error(api.get(base, params=params), 404)
    assert_error(api.get(base), 422)
    raw = [
        f"/api/v1/runs/{tracked}/artifacts/content?path=..%2F..%2Fkeel.db&step=train",
        f"/api/v1/runs/{tracked}/artifacts/content?path=%2Fetc%2Fpasswd&step=train",
        "/api/v1/artifacts/..%2F..%2Fkeel.db/content",
        "/api/v1/artifacts/%2Fetc%2Fpasswd",
        "/api/v1/artifacts/../../keel.db",
        f"/api/v1/artifacts/{'A' * 64}/content",
        f"/api/v1/artifacts/{'0' * 64}/content",
        f"/api/v1/runs/{tracked}/steps/..%2F..%2Fkeel.db/output/content",
        f"/api/v1/runs/..%2F{tracked}/result/content",
    ]
    for url in raw:
        reply = api.get(url)
        assert reply.status_code in (404, 422), (url, reply.status_code)
        assert_error(reply, reply.status_code)
        assert b"SQLite" not in reply.content and b"root:" not in reply.content


# -- params, metrics, experiments ----------------------------------------------------------------


def test_params_metrics_and_history(api: TestClient, tracked: str) -> None:
    run = api.get(f"/api/v1/runs/{tracked}/data").json()
    assert run["params"] == {"epochs": "50"}
    assert [m["key"] for m in run["metrics"]] == ["final"] and run["metrics"][0]["value"] == 0.5
    step = api.get(f"/api/v1/runs/{tracked}/data", params={"step": "train"}).json()
    assert step["params"] == {"epochs": "50", "lr": "0.1"} or step["params"]["lr"] == "0.1"
    latest = {m["key"]: m for m in step["metrics"]}
    assert latest["loss"]["step"] == 49 and latest["broken"]["value"] == "NaN"
    history = api.get(
        f"/api/v1/runs/{tracked}/metrics/history", params={"key": "loss", "step": "train"}
    ).json()
    assert history["total"] == 50 and not history["downsampled"]
    assert [p["step"] for p in history["points"]] == list(range(50))
    small = api.get(
        f"/api/v1/runs/{tracked}/metrics/history",
        params={"key": "loss", "step": "train", "max_points": 8},
    ).json()
    steps = [p["step"] for p in small["points"]]
    assert small["downsampled"] and len(steps) <= 8 and steps[0] == 0 and steps[-1] == 49
    assert steps == sorted(set(steps))
    none = api.get(f"/api/v1/runs/{tracked}/metrics/history", params={"key": "nope"}).json()
    assert none["total"] == 0 and none["points"] == []
    assert_error(
        api.get(f"/api/v1/runs/{tracked}/metrics/history", params={"key": "loss", "max_points": 1}),
        422,
    )


def test_downsampling_keeps_the_ends_and_the_extremes() -> None:
    values = [0.0] * 1000
    values[137] = 50.0  # a spike
    values[612] = -20.0  # a dip
    points = [(i, v, False, float(i)) for i, v in enumerate(values)]
    kept = downsample(points, 40)
    assert len(kept) <= 40 and kept[0] == 0 and kept[-1] == 999
    assert 137 in kept and 612 in kept
    assert downsample(points[:10], 40) == list(range(10))
    with_nan = [(i, None, True, 0.0) for i in range(100)]
    assert downsample(with_nan, 8)[0] == 0


def test_metric_histories_of_several_runs(api: TestClient, tracked: str) -> None:
    other = launch(api, "tracked", params={"epochs": 5})
    wait_status(api, other["id"], "SUCCEEDED")
    both = api.get(
        "/api/v1/metrics/history", params={"key": "final", "run_id": [tracked, other["id"]]}
    ).json()
    assert [s["run_id"] for s in both["series"]] == [tracked, other["id"]]
    assert all(s["total"] == 1 for s in both["series"])
    assert_error(api.get("/api/v1/metrics/history", params={"key": "final"}), 422)
    compared = api.get("/api/v1/compare", params={"run_id": [tracked, other["id"]]}).json()
    assert compared["differing_params"] == ["epochs"]
    assert compared["metric_keys"] == ["final"]
    assert_error(api.get("/api/v1/compare", params={"run_id": ["nope"]}), 404)


def test_experiments_and_their_run_tables(api: TestClient, tracked: str) -> None:
    other = launch(api, "tracked", params={"epochs": 3})
    wait_status(api, other["id"], "SUCCEEDED")
    found = {e["name"]: e for e in api.get("/api/v1/experiments").json()}
    exp = found["server-tests"]
    assert exp["runs"] == 2
    assert api.get(f"/api/v1/experiments/{exp['id']}").json()["name"] == "server-tests"
    assert api.get("/api/v1/experiments/server-tests").json()["id"] == exp["id"]
    assert_error(api.get("/api/v1/experiments/nope"), 404)
    table = api.get("/api/v1/experiments/server-tests/runs").json()
    assert [r["run_id"] for r in table["runs"]] == [other["id"], tracked]
    assert table["param_keys"] == ["epochs"] and table["metric_keys"] == ["final"]
    ordered = api.get(
        "/api/v1/experiments/server-tests/runs",
        params={"filter": "params.epochs = '50'", "order_by": "metrics.final DESC"},
    ).json()
    assert [r["run_id"] for r in ordered["runs"]] == [tracked]
    with_steps = api.get(
        "/api/v1/experiments/server-tests/runs",
        params={"include_steps": True, "filter": "metrics.loss < 0.5"},
    ).json()
    assert {r["step_key"] for r in with_steps["runs"]} == {"train-5"}
    err = assert_error(
        api.get("/api/v1/experiments/server-tests/runs", params={"filter": "metrics.x >"}), 400
    )
    assert err["code"] == "bad_request"


# -- model registry -----------------------------------------------------------------------------


def _register(name: str = "digits") -> None:
    x = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    model = LogisticRegression().fit(x, [0, 1, 1, 0])
    keel.register_model(name, model, tags={"team": "ml"})
    keel.register_model(name, model)


def test_models_versions_aliases_history(app: FastAPI) -> None:
    _register()
    keys = tokens(open_store())
    viewer, operator, admin = (client(app, keys[r]) for r in ("viewer", "operator", "admin"))
    models = viewer.get("/api/v1/models").json()
    assert [(m["name"], m["versions"], m["latest_version"]) for m in models] == [("digits", 2, 2)]
    detail = viewer.get("/api/v1/models/digits").json()
    assert [v["version"] for v in detail["version_list"]] == [1, 2]
    assert detail["version_list"][0]["tags"] == {"team": "ml"}
    assert detail["version_list"][0]["flavor"] == "sklearn"
    assert viewer.get("/api/v1/models/digits/versions/latest").json()["version"] == 2
    assert_error(operator.put("/api/v1/models/digits/aliases/champion", json={"version": 1}), 403)
    moved = admin.put("/api/v1/models/digits/aliases/champion", json={"version": 1})
    assert moved.json() == {
        "name": "digits",
        "alias": "champion",
        "version": 1,
        "previous_version": None,
    }
    again = admin.put("/api/v1/models/digits/aliases/champion", json={"version": 2}).json()
    assert again["previous_version"] == 1
    assert viewer.get("/api/v1/models/digits/versions/champion").json()["aliases"] == ["champion"]
    assert viewer.get("/api/v1/models/digits/versions/@champion").json()["version"] == 2
    assert viewer.get("/api/v1/models/digits").json()["aliases"] == {"champion": 2}
    assert_error(admin.put("/api/v1/models/digits/aliases/latest", json={"version": 1}), 400)
    assert_error(admin.put("/api/v1/models/digits/aliases/x", json={"version": 9}), 404)
    assert_error(admin.put("/api/v1/models/digits/aliases/x", json={"version": 0}), 422)
    assert_error(admin.put("/api/v1/models/nope/aliases/x", json={"version": 1}), 404)
    assert_error(admin.put("/api/v1/models/bad name/aliases/x", json={"version": 1}), 400)
    assert_error(operator.delete("/api/v1/models/digits/aliases/champion"), 403)
    assert admin.delete("/api/v1/models/digits/aliases/champion").json()["previous_version"] == 2
    assert_error(admin.delete("/api/v1/models/digits/aliases/champion"), 404)
    history = viewer.get("/api/v1/models/digits/history").json()
    actions = [(e["action"], e["actor"]) for e in history]
    assert actions[-3:] == [
        ("set_alias", "admin"),
        ("set_alias", "admin"),
        ("delete_alias", "admin"),
    ]
    assert_error(viewer.get("/api/v1/models/nope"), 404, "not_found")
    assert_error(viewer.get("/api/v1/models/digits/versions/7"), 404)
    assert_error(viewer.get("/api/v1/models/digits/versions/ghost"), 404)


def test_model_lineage(api: TestClient) -> None:
    _register("plain")
    lineage = api.get("/api/v1/models/plain/versions/1/lineage").json()
    assert lineage["model"] == {"name": "plain", "version": 1, "flavor": "sklearn"}
    assert lineage["inputs"] == [] and lineage["step"] is None
    assert_error(api.get("/api/v1/models/plain/versions/3/lineage"), 404)


# -- triggers -------------------------------------------------------------------------------------


def test_webhook_trigger(app: FastAPI) -> None:
    from keel.scheduler import triggers

    store = open_store()
    keys = tokens(store)
    info = triggers.add("hook", "flows.server_flows:arith", webhook=True, params={"y": 2})
    secret = info.config["token"]
    outsider = client(app)  # no API token: the webhook's own token is what counts
    reply = outsider.post(
        "/api/v1/triggers/hook", json={"x": 5}, headers={"X-Keel-Trigger-Token": secret}
    )
    assert reply.status_code == 202, reply.text
    run_id = reply.json()["run_id"]
    viewer = client(app, keys["viewer"])
    run = viewer.get(f"/api/v1/runs/{run_id}").json()
    assert run["params"] == {"x": 5, "y": 2} and run["trigger_name"] == "hook"
    by_query = outsider.post(f"/api/v1/triggers/hook?token={secret}", json={"x": 1})
    assert by_query.status_code == 202
    assert_error(outsider.post("/api/v1/triggers/hook", json={"x": 5}), 401)
    assert_error(
        outsider.post(
            "/api/v1/triggers/hook", json={"x": 5}, headers={"X-Keel-Trigger-Token": "wrong"}
        ),
        403,
    )
    err = assert_error(
        outsider.post(
            "/api/v1/triggers/hook", json={"x": "five"}, headers={"X-Keel-Trigger-Token": secret}
        ),
        422,
    )
    assert "'x'" in err["message"]
    some_token = {"X-Keel-Trigger-Token": "some"}
    assert_error(outsider.post("/api/v1/triggers/ghost", json={}, headers=some_token), 404)
    # Without any webhook token the request ends before its body is read (issue #9).
    assert_error(outsider.post("/api/v1/triggers/ghost", json={}), 401)
    triggers.add("on-end", "flows.server_flows:arith", on_run="tracked", params={"x": 1})
    assert_error(outsider.post("/api/v1/triggers/on-end", json={}, headers=some_token), 409)
    assert_error(
        outsider.post("/api/v1/triggers/on-end", json={}, headers={"X-Keel-Trigger-Token": ""}),
        401,
    )
    listed = viewer.get("/api/v1/triggers").json()
    assert [t["name"] for t in listed] == ["hook", "on-end"]
    assert secret not in json.dumps(listed)
    fired = viewer.get("/api/v1/triggers/hook/events").json()
    assert [e["run_id"] for e in fired][-1] == run_id
    assert_error(viewer.get("/api/v1/triggers/ghost/events"), 404)
    audit = client(app, keys["admin"]).get("/api/v1/audit").json()["entries"]
    assert any(e["actor"] == "webhook:hook" and e["status"] == 202 for e in audit)
