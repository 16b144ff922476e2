"""The real `mlflow` client (mlflow-skinny 3.x) against a live keel server, on SQLite and
PostgreSQL: experiments, runs, params/metrics/tags, artifacts, log_model/load_model,
the registry, runs search, nested runs; runs logged through mlflow seen by keel and
keel's own runs seen through mlflow; MLflow-shaped errors and the server's roles.

The server is keel's FastAPI app under uvicorn on a free loopback port, in a thread.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import keel

# mlflow.pyfunc warns about its own type hints when first imported.
pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(backend: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A keel server on the test's store; the mlflow client pointed at it."""
    import uvicorn

    from keel.server.app import create_app
    from keel.store.metadata import open_store

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    port = _free_port()
    config = uvicorn.Config(
        create_app(open_store()), host="127.0.0.1", port=port, log_level="warning"
    )
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uvicorn_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        yield url
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        uvicorn_server.should_exit = True
        thread.join(timeout=30)


def api(url: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", timeout=30, **kwargs)


# -- experiments ----------------------------------------------------------------------------


def test_experiments(server: str) -> None:
    client = MlflowClient()
    assert client.get_experiment_by_name("nope") is None  # a 404 RESOURCE_DOES_NOT_EXIST
    exp_id = client.create_experiment("mlf-exp", tags={"team": "vision"})
    assert exp_id.isdigit()
    got = client.get_experiment(exp_id)
    assert (got.name, got.lifecycle_stage, got.tags) == ("mlf-exp", "active", {"team": "vision"})
    assert got.artifact_location == f"mlflow-artifacts:/{exp_id}"
    assert client.get_experiment_by_name("mlf-exp").experiment_id == exp_id
    with pytest.raises(MlflowException) as info:
        client.create_experiment("mlf-exp")
    assert info.value.error_code == "RESOURCE_ALREADY_EXISTS"
    client.create_experiment("other")
    found = client.search_experiments(filter_string="name LIKE 'mlf-%'")
    assert [e.name for e in found] == ["mlf-exp"]
    client.set_experiment_tag(exp_id, "stage", "dev")
    assert client.get_experiment(exp_id).tags == {"team": "vision", "stage": "dev"}

    mlflow.set_experiment("mlf-exp")
    with mlflow.start_run() as run:
        pass
    client.delete_experiment(exp_id)
    deleted = client.get_experiment(exp_id)
    assert deleted.lifecycle_stage == "deleted"
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "deleted"
    assert "mlf-exp" not in [e.name for e in client.search_experiments()]
    client.restore_experiment(exp_id)
    assert client.get_experiment(exp_id).lifecycle_stage == "active"
    assert client.get_run(run.info.run_id).info.lifecycle_stage == "active"

    # MLflow's experiment "0" is keel's "Default".
    with mlflow.start_run(experiment_id="0") as default_run:
        pass
    assert default_run.info.experiment_id == "0"
    assert client.get_experiment("0").name == "Default"
    assert keel.Client().run(default_run.info.run_id).experiment_id is not None


# -- runs, params, metrics, tags --------------------------------------------------------------


def test_run_lifecycle_params_metrics_tags(server: str) -> None:
    client = MlflowClient()
    mlflow.set_experiment("mlf-runs")
    with mlflow.start_run(run_name="trainer") as run:
        run_id = run.info.run_id
        mlflow.log_param("lr", 0.1)
        mlflow.log_params({"optimizer": "sgd", "layers": 3})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metric("weird", float("nan"))
        mlflow.log_metric("big", float("inf"))
        mlflow.log_metric("small", float("-inf"))
        mlflow.log_metrics({"acc": 0.5, "f1": 0.25}, step=1)
        mlflow.set_tag("stage", "train")
        mlflow.set_tags({"owner": "ada", "temp": "x"})
        client.delete_tag(run_id, "temp")
        mlflow.log_param("lr", 0.1)  # the same value again is fine
        with pytest.raises(MlflowException) as info:
            mlflow.log_param("lr", 0.2)
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "trainer"
    assert got.info.end_time is not None and got.info.end_time >= got.info.start_time
    assert got.data.params == {"lr": "0.1", "optimizer": "sgd", "layers": "3"}
    metrics = got.data.metrics
    assert metrics["loss"] == 0.2 and metrics["acc"] == 0.5 and metrics["f1"] == 0.25
    assert math.isnan(metrics["weird"]) and metrics["big"] == math.inf
    assert metrics["small"] == -math.inf
    wanted = {"stage": "train", "owner": "ada", "mlflow.runName": "trainer"}
    assert {k: got.data.tags.get(k) for k in wanted} == wanted
    assert "temp" not in got.data.tags
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / (s + 1)) for s in range(5)]

    # keel sees the run as one of its own tracking runs.
    seen = keel.Client().run(run_id)
    assert (seen.kind, seen.status, seen.run_name) == ("tracking", "SUCCEEDED", "trainer")
    assert seen.data.params == {"lr": "0.1", "optimizer": "sgd", "layers": "3"}
    assert seen.data.metrics["loss"] == 0.2 and math.isnan(seen.data.metrics["weird"])
    assert [p.value for p in seen.metric_history("loss")] == [1.0 / (s + 1) for s in range(5)]
    found = keel.search_runs("mlf-runs", filter="metrics.loss < 0.5", output_format="list")
    assert [r["run_id"] for r in found] == [run_id]

    # statuses both ways, delete and restore
    failed = client.create_run(got.info.experiment_id, run_name="boom")
    client.set_terminated(failed.info.run_id, "FAILED")
    killed = client.create_run(got.info.experiment_id)
    client.set_terminated(killed.info.run_id, "KILLED")
    assert keel.Client().run(failed.info.run_id).status == "FAILED"
    assert keel.Client().run(killed.info.run_id).status == "CANCELLED"
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    client.delete_run(failed.info.run_id)
    assert client.get_run(failed.info.run_id).info.lifecycle_stage == "deleted"
    with pytest.raises(MlflowException) as info:
        client.log_param(failed.info.run_id, "x", 1)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"
    client.restore_run(failed.info.run_id)
    client.log_param(failed.info.run_id, "x", 1)
    with pytest.raises(MlflowException) as info:
        client.get_run("nosuchrun")
    assert info.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_log_batch_and_its_limits(server: str) -> None:
    client = MlflowClient()
    exp_id = client.create_experiment("mlf-batch")
    run_id = client.create_run(exp_id).info.run_id
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    points = [Metric("x", float(i), now + i, i) for i in range(2500)]
    params = [Param(f"p{i}", str(i)) for i in range(150)]
    client.log_batch(run_id, metrics=points, params=params, tags=[RunTag("t", "v")])
    history = client.get_metric_history(run_id, "x")
    assert len(history) == 2500 and history[-1].value == 2499.0
    got = client.get_run(run_id)
    assert len(got.data.params) == 150 and got.data.tags["t"] == "v"
    assert got.data.metrics["x"] == 2499.0

    body = {
        "run_id": run_id,
        "metrics": [{"key": "y", "value": 1, "timestamp": now, "step": 0}] * 1001,
    }
    reply = api(server, "POST", "/api/2.0/mlflow/runs/log-batch", json=body)
    assert reply.status_code == 400 and reply.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    # all or nothing: a bad metric after a good one records neither
    body = {
        "run_id": run_id,
        "metrics": [
            {"key": "z", "value": 1.0, "timestamp": now, "step": 0},
            {"key": "z", "value": "many", "timestamp": now, "step": 1},
        ],
    }
    reply = api(server, "POST", "/api/2.0/mlflow/runs/log-batch", json=body)
    assert reply.status_code == 400
    assert client.get_metric_history(run_id, "z") == []
    # NaN and the infinities travel as strings, as protobuf JSON writes them
    body = {"run_id": run_id, "key": "s", "value": "-Infinity", "timestamp": now, "step": 3}
    assert api(server, "POST", "/api/2.0/mlflow/runs/log-metric", json=body).status_code == 200
    reply = api(server, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})
    shown = {m["key"]: m["value"] for m in reply.json()["run"]["data"]["metrics"]}
    assert shown["s"] == "-Infinity"


# -- search and nested runs --------------------------------------------------------------------


def test_search_runs_filters_order_and_pages(server: str) -> None:
    client = MlflowClient()
    mlflow.set_experiment("mlf-search")
    ids = {}
    with mlflow.start_run(run_name="parent") as parent:
        for i, (model, acc) in enumerate([("svc", 0.7), ("tree", 0.9), ("svc", 0.8)]):
            with mlflow.start_run(run_name=f"child{i}", nested=True) as child:
                mlflow.log_param("model", model)
                mlflow.log_metric("acc", acc)
                ids[f"child{i}"] = child.info.run_id
    failed = client.create_run(parent.info.experiment_id, run_name="failed")
    client.set_terminated(failed.info.run_id, "FAILED")
    exp = [parent.info.experiment_id]

    def names(filter_string: str = "", order_by: list[str] | None = None) -> list[str]:
        runs = client.search_runs(exp, filter_string, order_by=order_by)
        return [r.info.run_name for r in runs]

    assert names("metrics.acc > 0.75", ["metrics.acc DESC"]) == ["child1", "child2"]
    assert sorted(names("params.model = 'svc'")) == ["child0", "child2"]
    assert names("params.model = 'svc' and metrics.acc > 0.75") == ["child2"]
    assert sorted(names(f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == [
        "child0",
        "child1",
        "child2",
    ]
    assert names("attributes.status = 'FAILED'") == ["failed"]
    assert names("tags.mlflow.runName = 'parent'") == ["parent"]
    assert names(order_by=["metrics.acc ASC"])[:3] == ["child0", "child2", "child1"]
    assert names(f"attributes.run_id = '{ids['child1']}'") == ["child1"]
    # the pandas form, as users call it
    frame = mlflow.search_runs(experiment_names=["mlf-search"], filter_string="metrics.acc > 0.85")
    assert list(frame["tags.mlflow.runName"]) == ["child1"]

    # pages of two, through page tokens
    seen: list[str] = []
    token = None
    while True:
        page = client.search_runs(exp, max_results=2, page_token=token)
        seen += [r.info.run_id for r in page]
        token = page.token
        if not token:
            break
    assert len(seen) == 5 and len(set(seen)) == 5

    # nested runs are keel nested runs; deleted runs only when asked for
    assert keel.Client().run(ids["child0"]).parent_id == parent.info.run_id
    client.delete_run(ids["child0"])
    assert "child0" not in names()
    from mlflow.entities import ViewType

    deleted = client.search_runs(exp, run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_name for r in deleted] == ["child0"]
    with pytest.raises(MlflowException) as info:
        client.search_runs(exp, "metrics.acc >")
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


# -- artifacts -------------------------------------------------------------------------------


def test_artifacts_upload_list_download(server: str, tmp_path: Path) -> None:
    client = MlflowClient()
    mlflow.set_experiment("mlf-artifacts")
    folder = tmp_path / "plots"
    (folder / "deep").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "deep" / "b.bin").write_bytes(bytes(range(256)))
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        mlflow.log_text("hello", "notes/hi.txt")
        mlflow.log_dict({"lr": 0.1}, "config.json")
        mlflow.log_artifacts(str(folder), "plots")
    top = client.list_artifacts(run_id)
    assert [(f.path, f.is_dir) for f in top] == [
        ("config.json", False),
        ("notes", True),
        ("plots", True),
    ]
    assert [(f.path, f.file_size) for f in client.list_artifacts(run_id, "plots/deep")] == [
        ("plots/deep/b.bin", 256)
    ]
    assert client.list_artifacts(run_id, "missing") == []
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/hi.txt") == "hello"
    local = Path(client.download_artifacts(run_id, "plots", str(tmp_path / "down")))
    assert (local / "deep" / "b.bin").read_bytes() == bytes(range(256))
    with pytest.raises(MlflowException):
        mlflow.artifacts.load_text(f"runs:/{run_id}/notes/missing.txt")

    # keel sees them as the run's logged artifacts, stored by content hash
    seen = keel.Client().run(run_id)
    assert [a.path for a in seen.logged_artifacts()] == [
        "config.json",
        "notes/hi.txt",
        "plots/a.txt",
        "plots/deep/b.bin",
    ]
    assert seen.read_artifact("notes/hi.txt") == b"hello"

    exp = run.info.experiment_id
    base = f"/api/2.0/mlflow-artifacts/artifacts/{exp}/{run_id}/artifacts"
    missing = api(server, "GET", f"{base}/nothing.txt")
    assert missing.status_code == 404 and missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    listed = api(server, "GET", "/api/2.0/mlflow-artifacts/artifacts", params={"path": "x/y/z"})
    assert listed.status_code == 404
    empty = api(
        server,
        "GET",
        "/api/2.0/mlflow-artifacts/artifacts",
        params={"path": f"{exp}/{run_id}/artifacts/nope"},
    )
    assert empty.status_code == 200 and empty.json() == {}
    for bad in ("..%2F..%2Fetc%2Fpasswd", "a/%2E%2E/b", "a/%2E/b", "%2E%2E"):
        reply = api(server, "PUT", f"{base}/{bad}", content=b"x")
        assert reply.status_code in (400, 404), bad
        assert "error_code" in reply.json()
    assert [a.path for a in keel.Client().run(run_id).logged_artifacts()][-1] == "plots/deep/b.bin"


# -- models: log_model, load_model, the registry ---------------------------------------------------


def _model() -> tuple[Any, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    features = rng.random((40, 3))
    labels = (features[:, 0] > 0.5).astype(int)
    return LogisticRegression().fit(features, labels), features


def test_sklearn_log_model_load_model_and_registry(server: str, tmp_path: Path) -> None:
    client = MlflowClient()
    model, features = _model()
    mlflow.set_experiment("mlf-models")
    with mlflow.start_run() as run:
        mlflow.log_metric("acc", 0.95)
        info = mlflow.sklearn.log_model(model, name="model", input_example=features[:2])
    run_id = run.info.run_id
    assert info.model_id.startswith("m-") and len(info.model_id) == 34
    expected = model.predict(features[:5])
    loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert list(loaded.predict(features[:5])) == list(expected)
    assert list(mlflow.sklearn.load_model(info.model_uri).predict(features[:5])) == list(expected)
    logged = client.get_logged_model(info.model_id)
    assert (logged.name, logged.source_run_id, logged.status) == ("model", run_id, "READY")
    assert client.get_metric_history(run_id, "acc")[0].value == 0.95  # not logged twice
    assert len(client.get_metric_history(run_id, "acc")) == 1

    first = mlflow.register_model(f"runs:/{run_id}/model", "mlf-digits")
    second = mlflow.register_model(info.model_uri, "mlf-digits")  # create answers 400, then v2
    assert (first.version, second.version) == ("1", "2")
    with pytest.raises(MlflowException) as err:
        client.create_registered_model("mlf-digits")
    assert err.value.error_code == "RESOURCE_ALREADY_EXISTS"
    client.set_registered_model_alias("mlf-digits", "champion", "1")
    assert client.get_model_version_by_alias("mlf-digits", "champion").version == "1"
    by_alias = mlflow.pyfunc.load_model("models:/mlf-digits@champion")
    assert list(by_alias.predict(features[:5])) == list(expected)
    versions = client.search_model_versions("name = 'mlf-digits'")
    assert sorted(v.version for v in versions) == ["1", "2"]
    registered = client.get_registered_model("mlf-digits")
    assert registered.aliases == {"champion": "1"}
    assert client.get_logged_model(info.model_id).tags.get("mlflow.modelVersions")

    # keel's registry holds the same versions and aliases, and their history
    from keel.tracking import registry

    numbers = [(v.version, v.flavor, v.run_id) for v in registry.list_versions("mlf-digits")]
    assert numbers[:2] == [(1, "mlflow", run_id), (2, "mlflow", None)]
    assert registry.get_version("mlf-digits", "champion").version == 1
    # ... and keel loads them: a run's model folder (v1) and a logged model (v2)
    for uri in ("models:/mlf-digits@champion", "models:/mlf-digits/2"):
        loaded_by_keel = keel.load_model(uri)
        assert type(loaded_by_keel.unwrap()).__name__ == "LogisticRegression"
        assert list(loaded_by_keel.predict(features[:5])) == list(expected)
    # a model folder uploaded as plain run artifacts, registered by its runs:/ path
    mlflow.sklearn.save_model(model, tmp_path / "saved")
    with mlflow.start_run(experiment_id=run.info.experiment_id) as folder_run:
        mlflow.log_artifacts(str(tmp_path / "saved"), "exported/model")
    folder_uri = f"runs:/{folder_run.info.run_id}/exported/model"
    by_folder = client.create_model_version(
        "mlf-digits", source=folder_uri, run_id=folder_run.info.run_id
    )
    folder_version = registry.get_version("mlf-digits", int(by_folder.version))
    assert folder_version.meta["mlflow_model_id"] is None
    loaded_by_keel = keel.load_model(f"models:/mlf-digits/{by_folder.version}")
    assert list(loaded_by_keel.predict(features[:5])) == list(expected)
    # keel re-registers an MLflow version as its own sklearn flavor
    native = keel.register_model("keel-digits", "models:/mlf-digits/2", flavor="sklearn")
    assert native.flavor == "sklearn"
    assert list(keel.load_model(native.uri).predict(features[:5])) == list(expected)
    elsewhere = client.create_model_version("mlf-digits", source="s3://bucket/not-here")
    with pytest.raises(keel.errors.ModelRegistryError, match="cannot find the files"):
        keel.load_model(f"models:/mlf-digits/{elsewhere.version}")
    client.delete_registered_model_alias("mlf-digits", "champion")
    with pytest.raises(MlflowException) as err:
        client.get_model_version_by_alias("mlf-digits", "champion")
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    actions = [e.action for e in registry.history("mlf-digits")]
    assert actions == [
        "create_model",
        "create_version",
        "create_version",
        "set_alias",
        "create_version",
        "create_version",
        "delete_alias",
    ]
    client.delete_registered_model("mlf-digits")
    with pytest.raises(MlflowException) as err:
        client.get_registered_model("mlf-digits")
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # sklearn, about an argument autolog uses
@pytest.mark.filterwarnings("ignore:Starting with pandas version 4.0")  # mlflow's dataset digest
def test_datasets_and_autolog(server: str) -> None:
    import pandas as pd

    client = MlflowClient()
    mlflow.set_experiment("mlf-inputs")
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [0.5, 0.25, 0.125]})
    dataset = mlflow.data.from_pandas(frame, name="train")
    with mlflow.start_run() as run:
        mlflow.log_input(dataset, context="training")
        mlflow.log_input(dataset, context="training")  # the same dataset again: one input
    inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("train", dataset.digest)]
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}

    model, features = _model()
    labels = model.predict(features)
    mlflow.sklearn.autolog()
    try:
        with mlflow.start_run() as auto:
            type(model)().fit(features, labels)
    finally:
        mlflow.sklearn.autolog(disable=True)
    got = client.get_run(auto.info.run_id)
    assert got.data.params["solver"] == "lbfgs"
    assert 0.0 <= got.data.metrics["training_accuracy_score"] <= 1.0
    assert got.inputs.dataset_inputs and got.outputs.model_outputs
    model_id = got.outputs.model_outputs[0].model_id
    reloaded = mlflow.sklearn.load_model(f"models:/{model_id}")
    assert list(reloaded.predict(features[:5])) == list(labels[:5])


# -- keel's own runs through mlflow ----------------------------------------------------------


@keel.task(name="mlf_fit")
def fit(lr: float) -> float:
    for epoch in range(3):
        keel.log_metric("loss", lr / (epoch + 1), step=epoch)
    return 0.9


@keel.workflow(name="mlf_pipeline")
def pipeline(lr: float = 0.5) -> float:
    accuracy = fit(lr)
    keel.log_metric("accuracy", accuracy)
    return accuracy


def test_native_keel_runs_are_readable_through_mlflow(server: str) -> None:
    run_id = keel.run(pipeline, lr=0.5).id
    client = MlflowClient()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "mlf_pipeline"
    assert got.data.params == {"lr": "0.5"} and got.data.metrics == {"accuracy": 0.9}
    exp_id = got.info.experiment_id
    assert client.get_experiment(exp_id).name == "mlf_pipeline"
    # the step is a nested run `<run_id>-<seq>`
    step = keel.Client().run(run_id).steps[0]
    nested = client.get_run(f"{run_id}-{step.seq}")
    assert nested.info.run_name == step.key
    assert nested.data.tags["mlflow.parentRunId"] == run_id
    history = client.get_metric_history(nested.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.25), (2, 0.5 / 3)]
    runs = client.search_runs([exp_id], "metrics.accuracy > 0.5")
    assert [r.info.run_id for r in runs] == [run_id]
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [r.info.run_id for r in children] == [nested.info.run_id]
    # keel's engine owns a workflow run's status
    with pytest.raises(MlflowException) as info:
        client.set_terminated(run_id, "KILLED")
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_keel_registered_versions_load_with_mlflow_pyfunc(server: str) -> None:
    import pandas as pd
    from sklearn.linear_model import LogisticRegression

    _, features = _model()
    frame = pd.DataFrame(features, columns=["a", "b", "c"])
    model = LogisticRegression().fit(frame, (frame["a"] > 0.5).astype(int))
    version = keel.register_model("keel-made", model, input_example=frame.head(3))
    expected = list(model.predict(frame.head(5)))
    loaded = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    assert list(loaded.predict(frame.head(5))) == expected
    keel.models.set_alias("keel-made", "prod", version.version)
    by_alias = mlflow.pyfunc.load_model("models:/keel-made@prod")
    assert list(by_alias.predict(frame.head(5))) == expected
    # keel's signature still guards the input, naming the column that is wrong
    with pytest.raises(keel.errors.SignatureError, match="'c'"):
        by_alias.predict(frame.head(5).drop(columns=["c"]))

    client = MlflowClient()
    uri = client.get_model_version_download_uri("keel-made", str(version.version))
    assert uri == f"mlflow-artifacts:/keel-models/keel-made/{version.version}"
    listed = api(server, "GET", "/api/2.0/mlflow-artifacts/artifacts", params={"path": uri[18:]})
    names = {f["path"] for f in listed.json()["files"]}
    assert names == {"MLmodel", "keel"}
    # read-only, and missing versions are 404s
    refused = api(server, "PUT", f"/api/2.0/mlflow-artifacts/artifacts/{uri[18:]}/MLmodel")
    assert refused.status_code == 400 and "read-only" in refused.text
    missing = api(server, "GET", "/api/2.0/mlflow-artifacts/artifacts/keel-models/keel-made/99")
    assert missing.status_code == 404
    # Digits int() refuses (a superscript two) or no row can have: not found, never a 500.
    for number in ("%C2%B2", str(2**70)):
        odd = api(
            server, "GET", f"/api/2.0/mlflow-artifacts/artifacts/keel-models/keel-made/{number}"
        )
        assert odd.status_code == 404, odd.text
    with pytest.raises(MlflowException):
        mlflow.pyfunc.load_model("models:/keel-made/99")


# -- errors, auth, the OpenAPI document --------------------------------------------------------


def test_mlflow_error_shape_and_unknown_endpoints(server: str) -> None:
    reply = api(server, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": "missing"})
    assert reply.status_code == 404
    assert reply.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST" and reply.json()["message"]
    reply = api(server, "GET", "/api/2.0/mlflow/experiments/get-by-name")
    assert (reply.status_code, reply.json()["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
    json_type = {"Content-Type": "application/json"}
    reply = api(
        server, "POST", "/api/2.0/mlflow/runs/create", content=b"{not json", headers=json_type
    )
    assert (reply.status_code, reply.json()["error_code"]) == (400, "BAD_REQUEST")
    # A body that does not say it is JSON is refused before it is parsed (issue #9).
    reply = api(server, "POST", "/api/2.0/mlflow/runs/create", content=b"{not json")
    assert (reply.status_code, reply.json()["error_code"]) == (415, "BAD_REQUEST")
    reply = api(server, "POST", "/ajax-api/2.0/mlflow/traces/start", json={})
    assert (reply.status_code, reply.json()["error_code"]) == (404, "ENDPOINT_NOT_FOUND")
    reply = api(server, "POST", "/ajax-api/2.0/mlflow/experiments/create", json={"name": "ajax"})
    assert reply.status_code == 200 and reply.json()["experiment_id"].isdigit()
    reply = api(server, "GET", "/api/3.0/mlflow/server-info")
    assert reply.json()["multipart_uploads_enabled"] is False
    schema = api(server, "GET", "/api/v1/openapi.json").json()
    assert not [p for p in schema["paths"] if "mlflow" in p]


def test_tokens_and_roles(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.server.auth import create_token
    from keel.store.metadata import open_store

    store = open_store()
    viewer = create_token(store, "mlf-viewer", "viewer")
    operator = create_token(store, "mlf-operator", "operator")
    admin = create_token(store, "mlf-admin", "admin")
    client = MlflowClient()

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", operator)
    exp_id = client.create_experiment("mlf-auth")
    run_id = client.create_run(exp_id).info.run_id
    client.log_metric(run_id, "m", 1.0)
    with pytest.raises(MlflowException) as info:
        client.create_registered_model("mlf-auth-model")
    assert info.value.error_code == "PERMISSION_DENIED"

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", viewer)
    assert client.get_run(run_id).data.metrics == {"m": 1.0}
    with pytest.raises(MlflowException) as info:
        client.log_metric(run_id, "m", 2.0)
    assert info.value.error_code == "PERMISSION_DENIED"

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", admin)
    client.create_registered_model("mlf-auth-model")

    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    reply = api(server, "GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})
    assert (reply.status_code, reply.json()["error_code"]) == (401, "UNAUTHENTICATED")
    reply = api(
        server,
        "GET",
        "/api/2.0/mlflow/runs/get",
        params={"run_id": run_id},
        headers={"Authorization": "Bearer not-a-token"},
    )
    assert reply.status_code == 401

    # every mutating call went to the audit log, with who made it
    import sqlalchemy as sa

    from keel.store.schema import audit_log

    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(audit_log.c.actor, audit_log.c.path, audit_log.c.status))
        seen = {(r.actor, r.path, r.status) for r in rows}
    assert ("mlf-operator", "/api/2.0/mlflow/runs/log-metric", 200) in seen
    assert ("mlf-viewer", "/api/2.0/mlflow/runs/log-metric", 403) in seen


# -- the `keel server` command -------------------------------------------------------------------


def test_keel_server_command_serves_the_mlflow_api(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real command in its own process: what a user points MLFLOW_TRACKING_URI at."""
    import os
    import subprocess
    import sys

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "server", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=os.environ.copy(),
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "keel server did not start"
            time.sleep(0.1)
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("mlf-cli")
        with mlflow.start_run(run_name="from-cli") as run:
            mlflow.log_param("k", "v")
            mlflow.log_metric("m", 1.5, step=2)
            mlflow.log_text("text", "a.txt")
        client = MlflowClient()
        got = client.get_run(run.info.run_id)
        assert (got.data.params, got.data.metrics) == ({"k": "v"}, {"m": 1.5})
        assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/a.txt") == "text"
        assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [
            run.info.run_id
        ]
        assert keel.Client().run(run.info.run_id).data.metrics == {"m": 1.5}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_keel_serve_answers_for_a_version_registered_by_mlflow(server: str) -> None:
    """A model logged and registered with the mlflow client is served by `keel serve`
    and predicts as MLflow's own loader does, from MLflow's own serving payload."""
    import httpx
    from mlflow.models import convert_input_example_to_serving_input

    model, features = _model()
    mlflow.set_experiment("mlf-serve")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(model, name="model", input_example=features[:2])
    mlflow.register_model(info.model_uri, "mlf-served")
    body = convert_input_example_to_serving_input(features[:5])
    assert body is not None
    with keel.serve("models:/mlf-served/1", port=0, background=True) as served:
        reply = httpx.post(
            f"{served.url}/invocations",
            content=body,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
    assert reply.status_code == 200, reply.text
    assert reply.json()["predictions"] == model.predict(features[:5]).tolist()
