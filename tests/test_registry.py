"""The model registry: register (live models, log_model URIs, steps), versions under
concurrency, aliases and their audit log, loading by alias/version/URI, flavors,
signatures, lineage, the `keel models` commands and every bad-input path.
Each test runs on SQLite and PostgreSQL (`backend`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

import keel
from keel.cli.main import app
from keel.errors import KeelError, ModelNotFoundError, ModelRegistryError, SignatureError
from keel.store.metadata import open_store
from keel.store.schema import model_versions
from keel.tracking.flavors import VersionWarning
from keel.tracking.signature import Signature

FEATURES = ["a", "b", "c", "d"]


def frame(n: int = 60, seed: int = 7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    data = pd.DataFrame(rng.random((n, 4)), columns=FEATURES)
    data["label"] = (data["a"] + data["b"] > 1).astype(int)
    return data


def fitted(data: pd.DataFrame | None = None, C: float = 1.0) -> LogisticRegression:
    data = frame() if data is None else data
    return LogisticRegression(C=C, max_iter=1000).fit(data[FEATURES], data["label"])


def fitted_on_arrays() -> tuple[LogisticRegression, np.ndarray]:
    data = frame()
    x = data[FEATURES].to_numpy()
    return LogisticRegression(max_iter=1000).fit(x, data["label"].to_numpy()), x


class Doubler:
    """A model that is not scikit-learn: the pyfunc flavor."""

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    def predict(self, data: Any) -> Any:
        return np.asarray(data) * self.factor


# -- a workflow whose task returns a fitted model -----------------------------------------


@keel.task(name="reg_load")
def load_rows(n: int) -> pd.DataFrame:
    return frame(n)


@keel.task(name="reg_features")
def add_features(data: pd.DataFrame) -> pd.DataFrame:
    return data.assign(ab=data["a"] * data["b"])


@keel.task(name="reg_train")
def train(data: pd.DataFrame, C: float) -> LogisticRegression:
    keel.log_param("C", C)
    model = fitted(data, C)
    keel.log_metric("train_accuracy", model.score(data[FEATURES], data["label"]))
    keel.log_model(model, "clf", input_example=data[FEATURES].head())
    return model


@keel.workflow(name="reg_pipeline")
def pipeline(n: int = 80, C: float = 1.0) -> str:
    keel.log_param("rows", n)
    table = add_features.submit(load_rows.submit(n))
    model = train(table, C)
    keel.log_metric("rows_used", n)
    return type(model).__name__


@keel.task(name="reg_fit_and_log")
def fit_and_log() -> str:
    return keel.log_model(fitted(), "clf", input_example=frame()[FEATURES].head())


@keel.workflow(name="reg_log_in_step")
def log_in_step() -> str:
    return fit_and_log()


@keel.task(name="reg_log_in_process", executor="processes")
def fit_and_log_in_process() -> tuple[str, int]:
    return keel.log_model(fitted(), "clf"), os.getpid()


@keel.workflow(name="reg_log_in_process_flow")
def log_in_process() -> tuple[str, int]:
    return fit_and_log_in_process()


@keel.workflow(name="reg_body_registers")
def body_registers(n: int = 70) -> int:
    model = train(add_features.submit(load_rows.submit(n)), 0.5)
    return keel.register_model("from_body", model, tags={"by": "workflow"}).version


@keel.task(name="reg_not_a_model")
def not_a_model() -> dict[str, int]:
    return {"a": 1}


@keel.task(name="reg_fails")
def fails() -> int:
    raise ValueError("no model today")


@keel.workflow(name="reg_odd_steps")
def odd_steps() -> int:
    not_a_model()
    try:
        fails()
    except ValueError:
        pass
    return 1


def run_pipeline(**params: Any) -> keel.Run:
    handle = keel.run(pipeline, **params)
    assert handle.status == "SUCCEEDED"
    return keel.Client().run(handle.id)


# -- registering -----------------------------------------------------------------------------


def test_register_a_live_sklearn_model_and_load_it(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_USER", "alice")
    model = fitted()
    data = frame()[FEATURES]
    v = keel.register_model(
        "iris_like", model, input_example=data.head(), tags={"team": "ml"}, description="first"
    )
    assert (v.name, v.version, v.flavor) == ("iris_like", 1, "sklearn")
    assert v.run_id is None and v.step_key is None
    assert v.created_by == "alice"
    assert v.tags == {"team": "ml"} and v.description == "first"
    assert v.uri == "models:/iris_like/1"
    assert v.signature is not None and [c.name for c in v.signature.columns or ()] == FEATURES
    assert v.meta["sklearn_version"] and v.meta["format"] == "joblib"
    loaded = keel.load_model("models:/iris_like/1")
    assert loaded.flavor == "sklearn"
    assert isinstance(loaded.unwrap(), LogisticRegression)
    assert list(loaded.predict(data)) == list(model.predict(data))
    assert np.allclose(loaded.predict_proba(data), model.predict_proba(data))
    assert list(loaded.classes_) == [0, 1]  # other attributes are the live model's


def test_a_live_model_registered_inside_a_run_is_logged_there(backend: str) -> None:
    with keel.start_run(experiment="reg") as run:
        keel.log_param("kind", "logreg")
        v = keel.register_model("in_run", fitted())
    assert v.run_id == run.id and v.step_key is None
    assert v.source_uri == f"runs:/{run.id}/in_run"
    logged = {a.path for a in keel.Client().run(run.id).logged_artifacts()}
    assert {"in_run/model.joblib", "in_run/keel-model.json"} <= logged
    assert keel.models.lineage("in_run", 1).params == {"kind": "logreg"}


def test_log_model_uris_for_a_run_and_a_step(backend: str) -> None:
    with keel.start_run() as run:
        uri = keel.log_model(fitted(), "clf")
    assert uri == f"runs:/{run.id}/clf"
    handle = keel.run(log_in_step)
    step = keel.Client().run(handle.id).step("reg_fit_and_log-0")
    assert handle.result() == f"runs:/{handle.id}/{step.key}/clf"


def test_register_from_a_log_model_uri_inside_a_step(backend: str) -> None:
    handle = keel.run(log_in_step)
    uri = handle.result()
    v = keel.register_model("from_uri", uri)
    assert v.run_id == handle.id and v.step_key == "reg_fit_and_log-0"
    assert v.source_uri == uri
    assert v.signature is not None and v.signature.kind == "columns"
    data = frame()[FEATURES]
    expected = fitted().predict(data)
    assert list(keel.load_model(uri).predict(data)) == list(expected)
    assert list(keel.load_model("models:/from_uri/1").predict(data)) == list(expected)


def test_log_model_in_a_worker_process_is_registered_from_its_uri(backend: str) -> None:
    handle = keel.run(log_in_process)
    uri, pid = handle.result()
    assert pid != os.getpid()
    assert uri == f"runs:/{handle.id}/reg_log_in_process-0/clf"
    v = keel.register_model("from_worker", uri)
    assert (v.run_id, v.step_key) == (handle.id, "reg_log_in_process-0")
    data = frame()[FEATURES]
    assert list(keel.load_model("models:/from_worker/1").predict(data)) == list(
        fitted().predict(data)
    )


def test_register_from_a_step_whose_task_returned_the_model(backend: str) -> None:
    run = run_pipeline(C=0.5)
    step = run.step("reg_train-2")
    v = keel.register_model("from_step", step)
    assert (v.run_id, v.step_key, v.seq) == (run.id, "reg_train-2", 2)
    assert v.source_hash == step.output_hash  # the recorded bytes, not a new copy
    assert v.source_uri == f"runs:/{run.id}/reg_train-2"
    # The fitted estimator knows its feature names: they become the signature.
    assert v.signature is not None and [c.name for c in v.signature.columns or ()] == FEATURES
    data = frame(80)[FEATURES]
    expected = step.output().predict(data)
    assert list(keel.load_model("models:/from_step/1").predict(data)) == list(expected)
    # The same step named by URI
    again = keel.register_model("from_step", f"runs:/{run.id}/reg_train-2")
    assert again.version == 2 and again.step_key == "reg_train-2"
    assert list(keel.load_model(f"runs:/{run.id}/reg_train-2").predict(data)) == list(expected)
    assert list(keel.load_model(f"runs:/{run.id}/reg_train-2/clf").predict(data)) == list(expected)


def test_a_workflow_body_registering_a_step_output_links_that_step(backend: str) -> None:
    handle = keel.run(body_registers)
    assert handle.result() == 1
    v = keel.models.get_version("from_body", 1)
    assert (v.run_id, v.step_key) == (handle.id, "reg_train-2")
    assert v.tags == {"by": "workflow"}
    assert [a.step_key for a in keel.models.lineage("from_body", 1).inputs] == [
        "reg_features-1",
        "reg_load-0",
    ]


def test_register_another_registered_version(backend: str) -> None:
    keel.register_model("candidates", Doubler(3))
    keel.models.set_alias("candidates", "best", 1)
    v = keel.register_model("production", "models:/candidates@best")
    assert (v.name, v.version, v.flavor) == ("production", 1, "pyfunc")
    assert list(keel.load_model("models:/production/1").predict([1, 2])) == [3, 6]


# -- versions ----------------------------------------------------------------------------------


def test_versions_count_up_per_name(backend: str) -> None:
    assert [keel.register_model("a", Doubler(i)).version for i in range(3)] == [1, 2, 3]
    assert keel.register_model("b", Doubler()).version == 1
    assert [v.version for v in keel.models.list_versions("a")] == [1, 2, 3]
    assert keel.models.get_version("a").version == 3  # latest by default
    assert keel.models.get_version("a", "latest").version == 3
    assert keel.load_model("models:/a/latest").predict([1]) == [2.0]
    assert keel.load_model("models:/a/1").predict([1]) == [0.0]
    listed = {m.name: m for m in keel.models.list_models()}
    assert (listed["a"].latest_version, listed["a"].versions) == (3, 3)
    assert (listed["b"].latest_version, listed["b"].versions) == (1, 1)


def test_concurrent_registration_in_threads_gets_distinct_versions(backend: str) -> None:
    keel.models.list_models()  # open (and migrate) the store before the race
    threads, per_thread = 6, 3
    barrier = threading.Barrier(threads)
    got: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_thread):
                v = keel.register_model("raced", Doubler(i * 10 + j))
                with lock:
                    got.append(v.version)
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, threads * per_thread + 1))
    events = [e for e in keel.models.history("raced") if e.action == "create_version"]
    assert sorted(e.version or 0 for e in events) == sorted(got)


PROCESS_SCRIPT = """
import pathlib, sys, time
import keel

class Const:
    def predict(self, data):
        return [1] * len(data)

go = pathlib.Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
print(",".join(str(keel.register_model("shared", Const()).version) for _ in range(4)))
"""


def test_concurrent_registration_in_processes_gets_distinct_versions(
    backend: str, tmp_path: Path
) -> None:
    keel.models.list_models()  # the store exists before the processes start
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_SCRIPT, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        for _ in range(3)
    ]
    go.touch()
    versions: list[int] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        versions += [int(x) for x in out.strip().split(",")]
    assert sorted(versions) == list(range(1, 13))


# -- aliases and the audit log -------------------------------------------------------------------


def test_alias_moves_are_recorded_with_who_when_and_the_previous_version(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for factor in (1, 2, 3):
        keel.register_model("digits", Doubler(factor))
    monkeypatch.setenv("KEEL_USER", "alice")
    v = keel.models.set_alias("digits", "champion", 1)
    assert v.aliases == ("champion",)
    monkeypatch.setenv("KEEL_USER", "bob")
    keel.models.set_alias("digits", "champion", "2")
    keel.models.set_alias("digits", "staging", 3)
    assert keel.models.get_version("digits", "champion").version == 2
    assert keel.models.get_version("digits", "@staging").version == 3
    assert keel.load_model("models:/digits@champion").predict([1]) == [2.0]
    monkeypatch.setenv("KEEL_USER", "carol")
    keel.models.delete_alias("digits", "staging")
    moves = [e for e in keel.models.history("digits") if "alias" in e.action]
    assert [(e.action, e.alias, e.version, e.previous_version, e.actor) for e in moves] == [
        ("set_alias", "champion", 1, None, "alice"),
        ("set_alias", "champion", 2, 1, "bob"),
        ("set_alias", "staging", 3, None, "bob"),
        ("delete_alias", "staging", None, 3, "carol"),
    ]
    assert all(e.at.tzinfo is not None for e in moves)
    assert {m.name: m.aliases for m in keel.models.list_models()} == {"digits": {"champion": 2}}
    with pytest.raises(ModelNotFoundError, match="no alias 'staging'"):
        keel.load_model("models:/digits@staging")


def test_version_tags_and_descriptions_are_audited(backend: str) -> None:
    keel.register_model("tagged", Doubler(), tags={"stage": "dev"})
    keel.models.set_version_tag("tagged", 1, "stage", "prod")
    keel.models.set_version_tag("tagged", 1, "owner", "ml-team")
    keel.models.delete_version_tag("tagged", 1, "owner")
    keel.models.set_description("tagged", "doubles things")
    keel.models.set_description("tagged", "version one", version=1)
    v = keel.models.get_version("tagged", 1)
    assert v.tags == {"stage": "prod"} and v.description == "version one"
    assert keel.models.list_models()[0].description == "doubles things"
    actions = [e.action for e in keel.models.history("tagged")]
    assert actions == [
        "create_version",
        "set_version_tag",
        "set_version_tag",
        "delete_version_tag",
        "set_description",
        "set_description",
    ]


# -- flavors -----------------------------------------------------------------------------------


def test_pyfunc_objects_and_functions_round_trip(backend: str) -> None:
    v = keel.register_model("doubler", Doubler(2.5))
    assert v.flavor == "pyfunc"
    loaded = keel.load_model("models:/doubler/1")
    assert isinstance(loaded.unwrap(), Doubler) and loaded.factor == 2.5
    assert list(loaded.predict([1.0, 2.0])) == [2.5, 5.0]
    keel.register_model("fn", lambda rows: [r * 10 for r in rows])
    assert keel.load_model("models:/fn/1").predict([1, 2]) == [10, 20]
    # A scikit-learn model may be kept as pyfunc too, when asked.
    assert keel.register_model("as_pyfunc", fitted(), flavor="pyfunc").flavor == "pyfunc"


def test_onnx_flavor_round_trips_a_converted_sklearn_model(backend: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skl2onnx")
    model, x = fitted_on_arrays()
    v = keel.register_model("onnx_clf", model, flavor="onnx", input_example=x[:5])
    assert v.flavor == "onnx" and v.meta["converted_from"].endswith("LogisticRegression")
    loaded = keel.load_model("models:/onnx_clf/1")
    assert list(loaded.predict(x)) == list(model.predict(x))
    assert np.allclose(loaded.predict_proba(x), model.predict_proba(x), atol=1e-5)
    with pytest.raises(SignatureError, match="dimension 1 has size 3; the model expects 4"):
        loaded.predict(x[:, :3])
    # An onnx.ModelProto is recognised by its type.
    proto = keel.load_model("models:/onnx_clf/1").unwrap()
    assert "OnnxModel" in repr(proto)
    from skl2onnx import to_onnx

    direct = keel.register_model("onnx_proto", to_onnx(model, x[:1].astype(np.float32)))
    assert direct.flavor == "onnx"
    assert list(keel.load_model("models:/onnx_proto/1").predict(x)) == list(model.predict(x))


def test_sklearn_version_is_checked_at_load(backend: str) -> None:
    import sklearn

    keel.register_model("old", fitted())
    major, minor = sklearn.__version__.split(".")[:2]
    store = open_store()

    def saved_with(version: str) -> None:
        row = keel.models.get_version("old", 1)
        meta = {**row.meta, "sklearn_version": version}
        with store.engine.begin() as conn:
            conn.execute(
                model_versions.update()
                .where(model_versions.c.name == "old")
                .values(meta=json.dumps(meta))
            )

    saved_with(f"{major}.{minor}.999")  # another patch release: no warning
    keel.load_model("models:/old/1")
    saved_with("0.24.2")
    with pytest.warns(VersionWarning, match=r"saved with scikit-learn 0\.24\.2 and is loaded"):
        keel.load_model("models:/old/1")


def test_pyfunc_warns_across_python_minor_versions(backend: str) -> None:
    keel.register_model("py", Doubler())
    store = open_store()
    meta = {**keel.models.get_version("py", 1).meta, "python_version": "3.6.15"}
    with store.engine.begin() as conn:
        conn.execute(model_versions.update().values(meta=json.dumps(meta)))
    with pytest.warns(VersionWarning, match="Python 3.6.15"):
        keel.load_model("models:/py/1")


# -- signatures --------------------------------------------------------------------------------


def test_dataframe_signature_names_the_mismatched_column(backend: str) -> None:
    data = frame()[FEATURES]
    keel.register_model("sig", fitted(), input_example=data.head())
    loaded = keel.load_model("models:/sig/1")
    with pytest.raises(SignatureError, match="missing column 'c'"):
        loaded.predict(data.drop(columns=["c"]))
    with pytest.raises(SignatureError, match="column 'extra' that the model does not expect"):
        loaded.predict(data.assign(extra=1.0))
    with pytest.raises(SignatureError, match="column 'b' has dtype str; the model expects float64"):
        loaded.predict(data.assign(b=data["b"].astype(str)))
    with pytest.raises(SignatureError, match="expects a pandas DataFrame"):
        loaded.predict(data.to_numpy())
    with pytest.raises(SignatureError, match="missing column 'd'"):
        loaded.predict_proba(data.drop(columns=["d"]))  # other predict-style methods too
    # Columns in another order are put in the model's order; ints may go where floats do.
    shuffled = data[["d", "b", "a", "c"]]
    assert list(loaded.predict(shuffled)) == list(fitted().predict(data))
    assert len(loaded.predict(data.round().astype("int64"))) == len(data)
    assert isinstance(loaded.signature, Signature) and "a: float64" in str(loaded.signature)


def test_array_signature_checks_shape_and_dtype(backend: str) -> None:
    model, x = fitted_on_arrays()
    keel.register_model("arr", model, input_example=x[:2])
    loaded = keel.load_model("models:/arr/1")
    assert loaded.signature is not None and loaded.signature.shape == (None, 4)
    with pytest.raises(SignatureError, match=r"dimension 1 has size 3; the model expects 4"):
        loaded.predict(x[:, :3])
    with pytest.raises(SignatureError, match=r"shape \(4,\) \(1 dimensions\); the model expects"):
        loaded.predict(x[0])
    with pytest.raises(SignatureError, match="dtype <U32; the model expects float64"):
        loaded.predict(x.astype(str))
    assert list(loaded.predict(x[:3].tolist())) == list(model.predict(x[:3]))  # lists are fine


def test_given_signature_and_fitted_estimator_signature(backend: str) -> None:
    model, _ = fitted_on_arrays()
    v = keel.register_model("given", model, signature={"shape": [None, 4], "dtype": "float64"})
    assert v.signature == Signature(shape=(None, 4), dtype="float64")
    # Without an example the fitted estimator's feature count is the signature.
    inferred = keel.register_model("inferred", model)
    assert inferred.signature == Signature(shape=(None, 4))
    with pytest.raises(SignatureError, match="expects 4"):
        keel.load_model("models:/inferred/1").predict(np.ones((2, 5)))


# -- lineage -----------------------------------------------------------------------------------


def test_lineage_from_version_to_run_step_params_metrics_and_upstream_data(backend: str) -> None:
    run = run_pipeline(n=90, C=0.25)
    keel.register_model("lin", run.step("reg_train-2"))
    lin = keel.models.lineage("lin", 1)
    assert lin.run is not None and lin.run.id == run.id
    assert lin.step is not None and lin.step.key == "reg_train-2"
    assert lin.experiment == "reg_pipeline"
    assert lin.params == {"n": "90", "C": "0.25", "rows": "90"}  # workflow inputs + logged
    assert lin.metrics == {"rows_used": 90.0}
    assert lin.step_params == {"C": "0.25"}
    assert set(lin.step_metrics) == {"train_accuracy"}
    assert [a.step_key for a in lin.inputs] == ["reg_features-1", "reg_load-0"]
    steps = {s.key: s for s in run.steps}
    for item in lin.inputs:
        assert item.hash == steps[item.step_key].output_hash
        assert item.size == steps[item.step_key].output_size and (item.size or 0) > 0
        assert item.type == "pandas.DataFrame"
    assert lin.inputs[0].inputs == ("reg_load-0",)
    assert {a.path for a in lin.logged} >= {"clf/model.joblib", "clf/keel-model.json"}
    as_json = lin.to_dict()
    assert as_json["step"]["key"] == "reg_train-2" and len(as_json["inputs"]) == 2

    result = CliRunner().invoke(app, ["models", "lineage", "lin/1"])
    assert result.exit_code == 0, result.output
    for text in (run.id, "reg_train-2", "reg_features-1", "reg_load-0", "C = 0.25"):
        assert text in result.output
    assert "train_accuracy" in result.output and "rows_used = 90" in result.output
    result = CliRunner().invoke(app, ["models", "lineage", "lin/1", "--json"])
    assert json.loads(result.output)["inputs"][1]["step"] == "reg_load-0"


def test_lineage_of_a_model_registered_outside_any_run(backend: str) -> None:
    keel.register_model("loose", Doubler())
    lin = keel.models.lineage("loose", 1)
    assert lin.run is None and lin.inputs == []
    result = CliRunner().invoke(app, ["models", "lineage", "loose@latest"])
    assert result.exit_code == 2  # 'latest' is not an alias
    result = CliRunner().invoke(app, ["models", "lineage", "loose/latest"])
    assert result.exit_code == 0 and "outside any run" in result.output


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_ls_show_alias_history(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_USER", "dora")
    runner = CliRunner()
    assert "no registered models" in runner.invoke(app, ["models", "ls"]).output
    keel.register_model("clf", fitted(), description="the first one")
    keel.register_model("clf", fitted(C=0.1))
    keel.models.set_description("clf", "a classifier")
    out = runner.invoke(app, ["models", "alias", "clf", "champion", "1"])
    assert out.exit_code == 0 and "clf@champion -> version 1" in out.output
    out = runner.invoke(app, ["models", "alias", "clf", "champion", "2"])
    assert "(was 1)" in out.output
    listed = runner.invoke(app, ["models", "ls"]).output
    assert "clf" in listed and "champion=2" in listed and "a classifier" in listed
    shown = runner.invoke(app, ["models", "show", "clf"]).output
    assert "champion" in shown and "dora" in shown
    one = runner.invoke(app, ["models", "show", "clf@champion"]).output
    assert "models:/clf/2" in one and "sklearn_version" in one and "a: any" in one
    out = runner.invoke(app, ["models", "alias", "clf", "champion", "--delete"])
    assert out.exit_code == 0
    log = runner.invoke(app, ["models", "history", "clf"]).output
    assert log.count("set_alias") == 2 and "delete_alias" in log and "dora" in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models", "show", "nope"], "no registered model named 'nope'"),
        (["models", "show", "clf/9"], "has no version 9"),
        (["models", "show", "clf@gone"], "has no alias 'gone'"),
        (["models", "lineage", "clf"], "names no version"),
        (["models", "alias", "clf", "prod"], "give the VERSION"),
        (["models", "alias", "clf", "prod", "7"], "has no version 7"),
        (["models", "alias", "clf", "latest", "1"], "'latest' cannot be an alias"),
        (["models", "alias", "clf", "prod", "--delete"], "has no alias 'prod'"),
        (["models", "history", "bad name"], "is not valid"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(backend: str, args: list[str], message: str) -> None:
    keel.register_model("clf", Doubler())
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output


# -- bad input -----------------------------------------------------------------------------------


def test_unknown_models_versions_and_aliases(backend: str) -> None:
    keel.register_model("known", Doubler())
    with pytest.raises(ModelNotFoundError, match="no registered model named 'knwon'") as err:
        keel.load_model("models:/knwon/1")
    assert "Did you mean 'known'" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="has no version 4 \\(it has versions 1 to 1\\)"):
        keel.load_model("models:/known/4")
    with pytest.raises(ModelNotFoundError, match="has no alias 'prod'"):
        keel.models.get_version("known", "prod")
    for call in (
        lambda: keel.models.history("ghost"),
        lambda: keel.models.list_versions("ghost"),
        lambda: keel.models.lineage("ghost", 1),
        lambda: keel.models.set_alias("ghost", "a", 1),
        lambda: keel.models.delete_alias("ghost", "a"),
        lambda: keel.models.set_description("ghost", "x"),
        lambda: keel.models.set_version_tag("ghost", 1, "k", "v"),
    ):
        with pytest.raises(ModelNotFoundError, match="no registered model named 'ghost'"):
            call()
    with pytest.raises(ModelNotFoundError, match="has no tag 'missing'"):
        keel.models.delete_version_tag("known", 1, "missing")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://bucket/model.pkl", "starts with neither models:/ nor runs:/"),
        ("models:/", "name a version or an alias"),
        ("models:/m", "name a version or an alias"),
        ("models:/m/abc", "'abc' is not a version number"),
        ("models:/m/1/2", "name a version or an alias"),
        ("models:/m@", "alias '' is not valid"),
        ("runs:/", "give the run id"),
        ("runs:/onlyarun", "give the run id"),
        ("runs:/zzzzzzzzzzzz/model", "no run with id 'zzzzzzzzzzzz'"),
    ],
)
def test_bad_uris_say_which_forms_are_accepted(backend: str, uri: str, message: str) -> None:
    with pytest.raises(ModelRegistryError) as err:
        keel.load_model(uri)
    assert message in str(err.value)
    assert (
        "models:/NAME/VERSION" in str(err.value)
        or "not valid" in str(err.value)
        or ("no run" in str(err.value))
    )


def test_a_runs_uri_to_nothing_lists_what_was_logged(backend: str) -> None:
    with keel.start_run() as run:
        keel.log_model(Doubler(), "doubler")
    with pytest.raises(ModelNotFoundError, match="nothing at") as err:
        keel.load_model(f"runs:/{run.id}/other")
    assert f"runs:/{run.id}/doubler" in str(err.value)
    with pytest.raises(ModelRegistryError, match="a string must be a model URI"):
        keel.register_model("x", f"file:///{run.id}")


def test_an_alias_pointing_at_a_missing_version(backend: str) -> None:
    keel.register_model("gone", Doubler())
    keel.register_model("gone", Doubler())
    with pytest.raises(ModelNotFoundError, match="has no version 5"):
        keel.models.set_alias("gone", "prod", 5)
    keel.models.set_alias("gone", "prod", 2)
    # Even if the version row disappears behind keel's back, the error says so.
    with open_store().engine.begin() as conn:
        conn.execute(
            sa.delete(model_versions).where(
                model_versions.c.name == "gone", model_versions.c.version == 2
            )
        )
    with pytest.raises(
        ModelNotFoundError, match="alias 'prod' of model 'gone' points at version 2"
    ):
        keel.load_model("models:/gone@prod")


@pytest.mark.parametrize(
    ("thing", "message"),
    [
        (42, "a int is not a model keel can save"),
        ({"weights": [1, 2]}, "a dict is not a model"),
        (LogisticRegression, "a type is not a model"),
        ("just a string", "a string must be a model URI"),
        (np.zeros(3), "a ndarray is not a model"),
    ],
)
def test_registering_something_that_is_not_a_model(backend: str, thing: Any, message: str) -> None:
    with pytest.raises(ModelRegistryError, match=message):
        keel.register_model("m", thing)
    assert keel.models.list_models() == []  # nothing half-registered


def test_registering_steps_that_hold_no_model(backend: str) -> None:
    handle = keel.run(odd_steps)
    run = keel.Client().run(handle.id)
    with pytest.raises(ModelRegistryError, match="output of step reg_not_a_model-0 is a dict"):
        keel.register_model("m", run.step("reg_not_a_model-0"))
    with pytest.raises(
        ModelRegistryError, match=r"step reg_fails-1 has no output to register \(status FAILED\)"
    ):
        keel.register_model("m", run.step("reg_fails-1"))
    with pytest.raises(ModelRegistryError, match="is a dict, not a model"):
        keel.register_model("m", f"runs:/{run.id}/reg_not_a_model-0")


@pytest.mark.parametrize("name", ["a/b", "has space", "", "@x", "-lead", "x" * 251, 7, None])
def test_bad_model_names(backend: str, name: Any) -> None:
    with pytest.raises(ModelRegistryError, match="is not valid"):
        keel.register_model(name, Doubler())


@pytest.mark.parametrize(("alias", "message"), [("latest", "cannot be an alias"),
                                                 ("3", "cannot be an alias"),
                                                 ("a b", "is not valid")])  # fmt: skip
def test_bad_alias_names(backend: str, alias: str, message: str) -> None:
    keel.register_model("m", Doubler())
    with pytest.raises(ModelRegistryError, match=message):
        keel.models.set_alias("m", alias, 1)


def test_bad_flavors_signatures_tags_and_arguments(backend: str) -> None:
    with pytest.raises(ModelRegistryError, match="unknown model flavor 'tensorflow'"):
        keel.register_model("m", Doubler(), flavor="tensorflow")
    with pytest.raises(ModelRegistryError, match="cannot be saved with the sklearn flavor"):
        keel.register_model("m", Doubler(), flavor="sklearn")
    with pytest.raises(ModelRegistryError, match="not a signature"):
        keel.register_model("m", Doubler(), signature={"columns": "abc"})
    with pytest.raises(ModelRegistryError, match="signature must be a keel Signature or a dict"):
        keel.register_model("m", Doubler(), signature=[1, 2])
    with pytest.raises(ModelRegistryError, match="cannot infer a signature"):
        keel.register_model("m", Doubler(), input_example="text")
    with pytest.raises(ModelRegistryError, match="tag key 1 must be a string"):
        keel.register_model("m", Doubler(), tags={1: "x"})
    with pytest.raises(ModelRegistryError, match="description must be a string"):
        keel.register_model("m", Doubler(), description=3)  # type: ignore[arg-type]
    with pytest.raises(ModelRegistryError, match="load_model takes a model URI string"):
        keel.load_model(3)
    keel.register_model("m", Doubler())
    with pytest.raises(ModelRegistryError, match="a version is a number or an alias"):
        keel.models.get_version("m", 1.5)  # type: ignore[arg-type]
    with pytest.raises(ModelNotFoundError, match="has no version 0"):
        keel.models.get_version("m", 0)
    with pytest.raises(ModelRegistryError, match=r"onnx flavor takes an onnx\.ModelProto"):
        keel.register_model("m", Doubler(), flavor="onnx")
    assert [v.version for v in keel.models.list_versions("m")] == [1]


def test_every_registry_error_is_a_keel_error() -> None:
    assert issubclass(ModelRegistryError, KeelError) and issubclass(SignatureError, KeelError)
    assert issubclass(ModelNotFoundError, ModelRegistryError)


def test_the_public_api() -> None:
    for name in ("log_model", "register_model", "load_model", "models"):
        assert name in keel.__all__
    for name in (
        "set_alias",
        "delete_alias",
        "get_version",
        "list_models",
        "list_versions",
        "set_version_tag",
        "set_description",
        "lineage",
        "history",
    ):
        assert callable(getattr(keel.models, name))


def test_onnx_regressor_predicts_like_scikit_learn(backend: str) -> None:
    pytest.importorskip("onnxruntime")
    from sklearn.linear_model import LinearRegression

    data = frame()
    model = LinearRegression().fit(data[FEATURES], data["a"] * 2 + data["b"])
    keel.register_model("onnx_reg", model, flavor="onnx", input_example=data[FEATURES].head())
    loaded = keel.load_model("models:/onnx_reg/1")
    got = loaded.predict(data[FEATURES])
    assert got.shape == (len(data),)
    assert np.allclose(got, model.predict(data[FEATURES]), atol=1e-4)
