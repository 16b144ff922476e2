"""keel.autolog: scikit-learn fits and LightGBM training recorded without logging code."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import (
    GridSearchCV,
    RandomizedSearchCV,
    cross_val_predict,
    cross_val_score,
)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

import keel
from keel.client import Run
from keel.tracking.autolog import base as autolog_base

X, Y = load_iris(return_X_y=True)


@pytest.fixture(autouse=True)
def autolog_off() -> Iterator[None]:
    yield
    keel.autolog(disable=True)


def nested_runs(run: Run, seq: int | None = None) -> list[Run]:
    """Tracked runs opened under a run (seq None) or under one of its steps."""
    return sorted(
        (child for child in run.children() if child._row.parent_seq == seq),
        key=lambda r: r.run_name or "",
    )


def model_names(tracked: Any) -> set[str]:
    """Names of the models logged into a run or step with keel.log_model."""
    suffix = "/keel-model.json"
    return {a.path[: -len(suffix)] for a in tracked.logged_artifacts() if a.path.endswith(suffix)}


# -- scikit-learn in a workflow step ----------------------------------------------------


@keel.task
def fit_classifier() -> float:
    model = LogisticRegression(C=0.5, max_iter=1000).fit(X, Y)
    return float(model.score(X, Y))


@keel.workflow
def classify() -> float:
    return fit_classifier()


def test_classifier_fit_in_a_step_logs_params_metrics_and_model(backend: str) -> None:
    keel.autolog(frameworks=["sklearn"])
    handle = keel.run(classify)
    assert handle.status == "SUCCEEDED"
    run = keel.Client().run(handle.id)
    step = run.step("fit_classifier")
    data = step.data
    assert data.params["C"] == "0.5"
    assert data.params["max_iter"] == "1000"
    assert data.tags["autolog.estimator"] == "LogisticRegression"
    for name in ("accuracy", "precision", "recall", "f1", "log_loss", "score"):
        assert f"training_{name}" in data.metrics, name
    assert data.metrics["training_accuracy"] == pytest.approx(handle.result())
    assert 0 < data.metrics["training_log_loss"] < 1
    assert "model" in model_names(step)
    assert nested_runs(run, step.seq) == []  # the fit recorded into the step itself
    assert run.data.params == {}  # and not into the workflow's run


@keel.task
def fit_search(max_tuning_runs: int | None) -> dict[str, Any]:
    keel.autolog(frameworks=["sklearn"], max_tuning_runs=max_tuning_runs)
    search = GridSearchCV(
        LogisticRegression(max_iter=1000), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3
    ).fit(X, Y)
    return {"best": search.best_params_, "ranks": search.cv_results_["rank_test_score"].tolist()}


@keel.workflow
def search_flow(max_tuning_runs: int | None = 50) -> dict[str, Any]:
    return fit_search(max_tuning_runs)


def test_grid_search_logs_a_nested_run_per_candidate_and_the_best(backend: str) -> None:
    handle = keel.run(search_flow)
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    result = handle.result()
    run = keel.Client().run(handle.id)
    step = run.step("fit_search")
    candidates = nested_runs(run, step.seq)
    assert [c.run_name for c in candidates] == [f"GridSearchCV-candidate-{i}" for i in range(4)]
    grid = ["0.01", "0.1", "1.0", "10.0"]
    for index, candidate in enumerate(candidates):
        data = candidate.data
        assert data.params == {"C": grid[index]}
        assert 0 < data.metrics["mean_test_score"] <= 1
        assert data.metrics["std_test_score"] >= 0
        assert data.metrics["rank_test_score"] == result["ranks"][index]
        assert candidate.status == "SUCCEEDED"
        assert nested_runs(candidate) == []  # the CV fits are no records of their own
    parent = step.data
    assert parent.params["best_C"] == str(result["best"]["C"])
    assert parent.params["estimator__max_iter"] == "1000"
    assert parent.params["estimator"] == "LogisticRegression"
    assert 0.9 < parent.metrics["best_cv_score"] <= 1
    assert "training_accuracy" in parent.metrics
    assert "cv_results.json" in {a.path for a in step.logged_artifacts()}
    assert {"model", "best_estimator"} <= model_names(step)


def test_max_tuning_runs_keeps_the_best_candidates(backend: str) -> None:
    handle = keel.run(search_flow, max_tuning_runs=2)
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    ranks = handle.result()["ranks"]
    run = keel.Client().run(handle.id)
    candidates = nested_runs(run, run.step("fit_search").seq)
    assert len(candidates) == 2
    kept = sorted(range(4), key=lambda i: (ranks[i], i))[:2]
    assert [c.run_name for c in candidates] == [f"GridSearchCV-candidate-{i}" for i in sorted(kept)]


@keel.task(executor="processes")
def fit_in_a_worker() -> int:
    # Autolog patches classes in its own process: a worker process enables it itself.
    keel.autolog(frameworks=["sklearn"], log_models=False)
    LogisticRegression(C=0.75, max_iter=1000).fit(X, Y)
    return os.getpid()


@keel.workflow
def in_a_worker() -> int:
    return fit_in_a_worker()


def test_autolog_in_a_process_executor_step(backend: str) -> None:
    handle = keel.run(in_a_worker)
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    assert handle.result() != os.getpid()
    data = keel.Client().run(handle.id).step("fit_in_a_worker").data
    assert data.params["C"] == "0.75"
    assert "training_accuracy" in data.metrics


# -- scikit-learn with start_run --------------------------------------------------------


def test_pipeline_is_logged_once_with_nested_params(backend: str) -> None:
    keel.autolog(frameworks=["sklearn"])
    with keel.start_run(experiment="autolog") as active:
        make_pipeline(StandardScaler(), LogisticRegression(C=2.0, max_iter=1000)).fit(X, Y)
    run = keel.Client().run(active.id)
    params = run.data.params
    assert params["logisticregression__C"] == "2.0"
    assert params["standardscaler__with_mean"] == "True"
    steps = "standardscaler: StandardScaler, logisticregression: LogisticRegression"
    assert params["steps"] == steps
    assert params["logisticregression"] == "LogisticRegression"
    assert run.data.tags["autolog.estimator"] == "Pipeline"
    assert "training_accuracy" in run.data.metrics
    assert nested_runs(run) == []  # the scaler's and the classifier's fits are internal
    assert model_names(run) == {"model"}


def test_regressor_gets_regression_metrics(backend: str) -> None:
    x, y = load_diabetes(return_X_y=True)
    keel.autolog(frameworks=["sklearn"])
    with keel.start_run() as active:
        model = Ridge(alpha=0.5).fit(x, y)
    metrics = keel.Client().run(active.id).data.metrics
    predicted = model.predict(x)
    assert metrics["training_mse"] == pytest.approx(float(np.mean((predicted - y) ** 2)))
    assert metrics["training_rmse"] == pytest.approx(metrics["training_mse"] ** 0.5)
    assert metrics["training_mae"] == pytest.approx(float(np.mean(np.abs(predicted - y))))
    assert metrics["training_r2"] == pytest.approx(metrics["training_score"])
    assert not any("accuracy" in key or "log_loss" in key for key in metrics)


def test_cross_validation_fits_are_not_records(backend: str) -> None:
    keel.autolog(frameworks=["sklearn"])
    with keel.start_run() as active:
        folds = cross_val_score(SVC(C=3.0), X, Y, cv=4)
        predicted = cross_val_predict(SVC(C=3.0), X, Y, cv=3)
        SVC(C=3.0).fit(X, Y)
    run = keel.Client().run(active.id)
    assert len(folds) == 4 and len(predicted) == len(Y)
    assert nested_runs(run) == []
    assert run.data.params["C"] == "3.0"
    assert "training_log_loss" not in run.data.metrics  # SVC has no predict_proba here


def test_each_later_fit_in_a_run_gets_a_nested_run(backend: str) -> None:
    keel.autolog(frameworks=["sklearn"])
    with keel.start_run() as active:
        scaler = StandardScaler().fit(X)
        LogisticRegression(C=4.0, max_iter=1000).fit(scaler.transform(X), Y)
        RandomizedSearchCV(SVC(), {"C": [0.1, 1.0, 10.0]}, n_iter=2, cv=3, random_state=0).fit(X, Y)
    run = keel.Client().run(active.id)
    assert run.data.tags["autolog.estimator"] == "StandardScaler"
    assert run.data.params["with_mean"] == "True"
    assert "C" not in run.data.params
    later = nested_runs(run)
    assert [r.run_name for r in later] == ["LogisticRegression", "RandomizedSearchCV"]
    assert later[0].data.params["C"] == "4.0"
    assert "training_f1" in later[0].data.metrics
    assert len(nested_runs(later[1])) == 2  # the search's candidates nest under its run


def test_searches_on_joblib_threads_record_once(backend: str) -> None:
    from joblib import parallel_backend

    keel.autolog(frameworks=["sklearn"])
    with keel.start_run() as active, parallel_backend("threading", n_jobs=2):
        GridSearchCV(SVC(), {"C": [0.1, 1.0, 10.0]}, cv=3, n_jobs=2).fit(X, Y)
    run = keel.Client().run(active.id)
    assert len(nested_runs(run)) == 3
    # No run was started on demand for a helper thread's fit.
    assert [r.id for r in keel.Client().runs(limit=None)] == [run.id]


def test_a_failing_fit_raises_as_usual_and_fails_its_run() -> None:
    keel.autolog(frameworks=["sklearn"])
    with keel.start_run() as active:
        StandardScaler().fit(X)
        with pytest.raises(ValueError, match="Unknown label type"):
            LogisticRegression().fit(X, np.linspace(0, 1, len(X)))
    (failed,) = nested_runs(keel.Client().run(active.id))
    assert failed.status == "FAILED"
    assert failed.error_type == "ValueError"


def test_log_models_false_logs_no_model() -> None:
    keel.autolog(frameworks=["sklearn"], log_models=False)
    with keel.start_run() as active:
        LogisticRegression(max_iter=1000).fit(X, Y)
    run = keel.Client().run(active.id)
    assert "training_accuracy" in run.data.metrics
    assert model_names(run) == set()


def test_fit_outside_any_run_records_into_the_run_started_on_demand(keel_home: Path) -> None:
    script = textwrap.dedent(
        """
        import keel
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV

        X, y = load_iris(return_X_y=True)
        keel.autolog(frameworks=["sklearn"])
        LogisticRegression(C=0.25, max_iter=1000).fit(X, y)
        GridSearchCV(LogisticRegression(max_iter=1000), {"C": [1.0, 2.0]}, cv=3).fit(X, y)
        """
    )
    env = {**os.environ, "KEEL_HOME": str(keel_home)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = keel.Client().runs(limit=None)
    assert run.kind == "tracking" and run.status == "SUCCEEDED"
    assert run.data.params["C"] == "0.25"
    (search,) = nested_runs(run)
    assert search.run_name == "GridSearchCV"
    assert len(nested_runs(search)) == 2


# -- safety ------------------------------------------------------------------------------


class Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no text for this param")

    __str__ = __repr__


class Fussy(ClassifierMixin, BaseEstimator):
    """A classifier whose `extra` param cannot be turned into text, and whose
    `lock` cannot be pickled (so the model cannot be saved)."""

    def __init__(self, extra: Any = None, lock: Any = None, c: float = 1.0) -> None:
        self.extra = extra
        self.lock = lock
        self.c = c

    def fit(self, x: Any, y: Any) -> Fussy:
        self.inner_ = LogisticRegression(max_iter=1000).fit(x, y)
        self.classes_ = self.inner_.classes_
        return self

    def predict(self, x: Any) -> Any:
        return self.inner_.predict(x)


def test_a_broken_logging_path_does_not_break_fit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    keel.autolog(frameworks=["sklearn"])
    autolog = keel.tracking.autolog.integrations()["sklearn"]
    autolog._patches.replace(Fussy, "fit", autolog._wrap_fit)  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger="keel.autolog")
    with keel.start_run() as active:
        model = Fussy(extra=Unprintable(), lock=threading.Lock(), c=0.5).fit(X, Y)
    assert model.predict(X[:3]).shape == (3,)
    run = keel.Client().run(active.id)
    assert run.data.params["c"] == "0.5"  # the other params are logged
    assert "extra" not in run.data.params
    assert "training_accuracy" in run.data.metrics
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "param 'extra'" in messages and "no text for this param" in messages
    assert "log the fitted Fussy" in messages
    assert run.status == "SUCCEEDED"


def test_a_failing_store_does_not_break_fit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.tracking import log

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    keel.autolog(frameworks=["sklearn"])
    caplog.set_level(logging.WARNING, logger="keel.autolog")
    with keel.start_run():
        monkeypatch.setattr(log, "log_params", broken)
        monkeypatch.setattr(log, "log_metrics", broken)
        monkeypatch.setattr(log, "set_tags", broken)
        model = LogisticRegression(max_iter=1000).fit(X, Y)
    assert model.score(X, Y) > 0.9
    assert "disk full" in caplog.text


# -- enabling and disabling ----------------------------------------------------------


def _fit_methods() -> dict[type, object]:
    from sklearn.utils import all_estimators

    classes = [cls for _, cls in all_estimators()] + [Pipeline, GridSearchCV]
    return {cls: vars(cls).get("fit") for cls in classes}


def test_disable_restores_the_original_methods() -> None:
    import lightgbm
    import lightgbm.sklearn
    import sklearn.model_selection._validation as validation

    before = _fit_methods()
    train, fit_and_score = lightgbm.train, validation._fit_and_score
    assert sorted(keel.autolog()) == ["lightgbm", "sklearn"]
    assert keel.tracking.autolog.enabled().keys() == {"lightgbm", "sklearn"}
    assert LogisticRegression.fit is not before[LogisticRegression]
    assert "fit" in vars(SVC) and before[SVC] is None  # inherited fit, patched on the class
    assert lightgbm.train is not train and lightgbm.sklearn.train is lightgbm.train
    keel.autolog()  # enabling twice does not wrap twice
    assert autolog_base.original(LogisticRegression.fit) is before[LogisticRegression]

    keel.autolog(disable=True)
    assert _fit_methods() == before
    assert lightgbm.train is train and lightgbm.sklearn.train is train
    assert validation._fit_and_score is fit_and_score
    assert keel.tracking.autolog.enabled() == {}
    with keel.start_run() as active:
        LogisticRegression(max_iter=1000).fit(X, Y)
    assert keel.Client().run(active.id).data.params == {}


def test_one_framework_can_be_disabled_alone() -> None:
    import lightgbm

    train = lightgbm.train
    keel.autolog()
    keel.autolog(disable=True, frameworks=["lightgbm"])
    assert lightgbm.train is train
    assert autolog_base.original(LogisticRegression.fit) is not LogisticRegression.fit


def test_bad_autolog_arguments_are_clear_errors() -> None:
    with pytest.raises(keel.TrackingError, match="no autolog integration named 'torch'") as err:
        keel.autolog(frameworks=["torch"])
    assert "sklearn" in str(err.value)
    with pytest.raises(keel.TrackingError, match="max_tuning_runs"):
        keel.autolog(max_tuning_runs=-1)
    with pytest.raises(keel.TrackingError, match="not an autolog integration"):
        keel.tracking.autolog.register(object())  # type: ignore[arg-type]


class Recording:
    """A minimal third-party integration, as docs/autolog.md describes."""

    name = "recording"

    def __init__(self, available: bool = True) -> None:
        self.available = available
        self.calls: list[str] = []

    def is_available(self) -> bool:
        return self.available

    def enable(self, config: keel.tracking.autolog.AutologConfig) -> None:
        self.calls.append(f"enable max_tuning_runs={config.max_tuning_runs}")

    def disable(self) -> None:
        self.calls.append("disable")


def test_other_frameworks_plug_in_with_register() -> None:
    from keel.tracking.autolog import base

    hook = Recording()
    keel.tracking.autolog.register(hook)
    try:
        assert keel.autolog(frameworks=["recording"], max_tuning_runs=3) == ["recording"]
        keel.autolog(disable=True, frameworks=["recording"])
        assert hook.calls == ["enable max_tuning_runs=3", "disable"]
        missing = Recording(available=False)
        keel.tracking.autolog.register(missing)
        assert "recording" not in keel.autolog()  # skipped: not installed
        with pytest.raises(keel.TrackingError, match="not installed"):
            keel.autolog(frameworks=["recording"])
    finally:
        del base._registry["recording"]


# -- LightGBM ------------------------------------------------------------------------------


@keel.task
def boost(rounds: int, early_stopping: bool) -> dict[str, Any]:
    import lightgbm as lgb

    x_train, y_train = X[::2], Y[::2]
    x_val, y_val = X[1::2], Y[1::2]
    train = lgb.Dataset(x_train, y_train)
    valid = lgb.Dataset(x_val, y_val, reference=train)
    callbacks = [lgb.early_stopping(3, verbose=False)] if early_stopping else []
    booster = lgb.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "learning_rate": 0.3},
        train,
        num_boost_round=rounds,
        valid_sets=[train, valid],
        valid_names=["train", "valid"],
        callbacks=callbacks,
    )
    return {"iterations": booster.current_iteration(), "best": booster.best_iteration}


@keel.workflow
def boosting(rounds: int = 8, early_stopping: bool = False) -> dict[str, Any]:
    return boost(rounds, early_stopping)


def test_lightgbm_logs_each_iterations_metrics_with_its_step(backend: str) -> None:
    keel.autolog(frameworks=["lightgbm"])
    handle = keel.run(boosting, rounds=8)
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    step = keel.Client().run(handle.id).step("boost")
    data = step.data
    assert data.params["objective"] == "multiclass"
    assert data.params["learning_rate"] == "0.3"
    assert data.params["num_boost_round"] == "8"
    assert data.params["valid_names"] == "train, valid"
    for key in ("train-multi_logloss", "valid-multi_logloss"):
        history = step.metric_history(key)
        assert [p.step for p in history] == list(range(8)), key
        assert history[-1].value < history[0].value
    assert data.metrics["stopped_iteration"] == 8
    assert "feature_importance.json" in {a.path for a in step.logged_artifacts()}
    assert "model" in model_names(step)


def test_lightgbm_early_stopping_records_the_best_iteration(backend: str) -> None:
    keel.autolog(frameworks=["lightgbm"])
    handle = keel.run(boosting, rounds=200, early_stopping=True)
    result = handle.result()
    step = keel.Client().run(handle.id).step("boost")
    assert result["iterations"] == result["best"] < 200  # the booster keeps the best trees
    history = step.metric_history("valid-multi_logloss")
    assert len(history) == result["best"] + 3  # three more rounds without improvement
    assert step.data.metrics["best_iteration"] == result["best"]
    assert step.data.metrics["stopped_iteration"] == len(history)


def test_lightgbm_inside_a_sklearn_pipeline_is_one_record() -> None:
    from lightgbm import LGBMClassifier

    keel.autolog()
    with keel.start_run() as active:
        make_pipeline(StandardScaler(), LGBMClassifier(n_estimators=5, verbose=-1)).fit(X, Y)
    run = keel.Client().run(active.id)
    assert run.data.params["lgbmclassifier__n_estimators"] == "5"
    assert "num_boost_round" not in run.data.params  # lightgbm.train ran inside the fit
    assert nested_runs(run) == []


def test_lightgbm_sklearn_api_is_logged_through_train() -> None:
    from lightgbm import LGBMRegressor

    x, y = load_diabetes(return_X_y=True)
    keel.autolog(frameworks=["lightgbm"])
    with keel.start_run() as active:
        LGBMRegressor(n_estimators=6, verbose=-1).fit(x, y, eval_X=(x[::2],), eval_y=(y[::2],))
    run = keel.Client().run(active.id)
    assert run.data.params["num_boost_round"] == "6"
    assert [p.step for p in run.metric_history("valid_0-l2")] == list(range(6))
