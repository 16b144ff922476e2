"""Handwritten digits: a hyperparameter sweep as a durable keel workflow.

    make demo                                           # or: python examples/digits.py
    keel run examples/digits.py:digits --param n_folds=3

load -> split (train / validation / test) -> one `evaluate` step per configuration,
fanned out with `map` -> pick the best -> refit it on train + validation (the fitted
model is the step's output, kept as an artifact) and register it as a new version of
`digits`, with the alias `champion` -> accuracy on the held-out test set.

Every step is recorded in the embedded store under KEEL_HOME (default ~/.keel); no
server is involved. Each step is also a nested tracked run: the sweep's steps log
their configuration as params and their CV and validation accuracy as metrics, so
the experiment `digits` shows one nested run per configuration. Load the champion
back anywhere with `keel.load_model("models:/digits@champion")`.

The steps are pure functions of their inputs and use `cache=True`, so running the
demo a second time is served from the cache. That includes the registration, which
happens inside `refit`: the same model is not registered twice, and `champion` stays
at the version the first run created. A model that changes (other data,
configurations or code) makes `refit` run again: a new version, and `champion` moves.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

import keel

# The cache key covers each task's own source code, but not helpers such as
# `make_model` below: bump this when they change, so old results are not reused.
CACHE_VERSION = "1"
MODEL_NAME = "digits"
ALIAS = "champion"

Splits = dict[str, np.ndarray]


def sweep_space() -> list[dict[str, Any]]:
    """The configurations to try: an SVC grid and a few logistic regressions."""
    svc = [
        {"model": "svc", "C": c, "gamma": gamma}
        for c in (0.1, 1.0, 10.0, 100.0)
        for gamma in (1e-4, 3e-4, 1e-3, 3e-3)
    ]
    logreg = [{"model": "logreg", "C": c} for c in (0.01, 0.1, 1.0, 10.0)]
    return svc + logreg


def make_model(config: dict[str, Any]) -> BaseEstimator:
    if config["model"] == "svc":
        return SVC(C=config["C"], gamma=config["gamma"])
    return make_pipeline(StandardScaler(), LogisticRegression(C=config["C"], max_iter=2000))


@keel.task(cache=True, cache_version=CACHE_VERSION)
def load_dataset() -> dict[str, np.ndarray]:
    """The 8x8 digit images bundled with scikit-learn (nothing is downloaded)."""
    images, labels = load_digits(return_X_y=True)
    keel.context().logger.info("loaded %d images of %d pixels", *images.shape)
    return {"X": images, "y": labels}


@keel.task(cache=True, cache_version=CACHE_VERSION)
def split(data: dict[str, np.ndarray], test_size: float, val_size: float, seed: int) -> Splits:
    """Stratified train / validation / test split; the test part is not looked at until the end."""
    x_rest, x_test, y_rest, y_test = train_test_split(
        data["X"], data["y"], test_size=test_size, random_state=seed, stratify=data["y"]
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_size, random_state=seed, stratify=y_rest
    )
    keel.context().logger.info(
        "train %d, validation %d, test %d", len(y_train), len(y_val), len(y_test)
    )
    return {
        "X_train": x_train,
        "y_train": y_train,
        "X_val": x_val,
        "y_val": y_val,
        "X_test": x_test,
        "y_test": y_test,
    }


@keel.task(cache=True, cache_version=CACHE_VERSION)
def evaluate(config: dict[str, Any], splits: Splits, n_folds: int) -> dict[str, Any]:
    """Cross-validate one configuration on the training part, then score it on validation."""
    keel.log_params({**config, "n_folds": n_folds})  # this step is a nested run
    model = make_model(config)
    folds = cross_val_score(model, splits["X_train"], splits["y_train"], cv=n_folds)
    model.fit(splits["X_train"], splits["y_train"])
    val_accuracy = float(model.score(splits["X_val"], splits["y_val"]))
    keel.log_metrics(
        {
            "cv_accuracy": float(folds.mean()),
            "cv_accuracy_std": float(folds.std()),
            "val_accuracy": val_accuracy,
        }
    )
    keel.context().logger.info(
        "%s: %d-fold CV %.4f ± %.4f, validation %.4f",
        config,
        n_folds,
        folds.mean(),
        folds.std(),
        val_accuracy,
    )
    return {
        "config": config,
        "cv_accuracy": float(folds.mean()),
        "val_accuracy": val_accuracy,
    }


@keel.task(cache=True, cache_version=CACHE_VERSION)
def pick_best(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The configuration with the best validation accuracy (CV accuracy breaks ties)."""
    ranked = sorted(scores, key=lambda s: (s["val_accuracy"], s["cv_accuracy"]), reverse=True)
    print("rank  validation  cv      configuration")
    for rank, score in enumerate(ranked, 1):
        val, cv = score["val_accuracy"], score["cv_accuracy"]
        print(f"{rank:>4}  {val:.4f}      {cv:.4f}  {score['config']}")
    return ranked[0]


@keel.task(cache=True, cache_version=CACHE_VERSION)
def refit(config: dict[str, Any], splits: Splits) -> BaseEstimator:
    """Fit the chosen configuration on train + validation and register it.

    keel stores the fitted model as the step's output. `register_model` also saves it
    into this step (a nested run) as a new version of `digits`, linked to this step,
    its params and its inputs (`keel models lineage digits/1`); `champion` moves to it.
    """
    ctx = keel.context()
    model = make_model(config)
    x = np.concatenate([splits["X_train"], splits["X_val"]])
    y = np.concatenate([splits["y_train"], splits["y_val"]])
    ctx.logger.info("refitting %s on %d images", config, len(y))
    keel.log_params({**config, "train_size": len(y)})
    model.fit(x, y)
    version = keel.register_model(
        MODEL_NAME,
        model,
        input_example=x[:5],  # the signature: (n, 64) float64 pixels
        description=f"{type(model).__name__} chosen by the digits sweep: {config}",
    )
    keel.models.set_alias(MODEL_NAME, ALIAS, version.version)
    ctx.logger.info("registered %s version %d as %r", MODEL_NAME, version.version, ALIAS)
    return model


@keel.task(cache=True, cache_version=CACHE_VERSION)
def score_test(model: BaseEstimator, splits: Splits) -> float:
    """Accuracy on the held-out test set."""
    accuracy = float(model.score(splits["X_test"], splits["y_test"]))
    keel.context().logger.info("test accuracy %.4f on %d images", accuracy, len(splits["y_test"]))
    keel.log_metric("test_accuracy", accuracy)
    return accuracy


@keel.workflow
def digits(
    seed: int = 0, test_size: float = 0.2, val_size: float = 0.2, n_folds: int = 5
) -> dict[str, Any]:
    """Choose a digit classifier by a sweep, refit it, and report its test accuracy."""
    data = load_dataset.submit()
    # Futures passed as arguments are dependency edges: `split` starts when
    # `load_dataset` is done, and every `evaluate` when `split` is.
    splits = split.submit(data, test_size=test_size, val_size=val_size, seed=seed)
    scores = evaluate.map(sweep_space(), splits=splits, n_folds=n_folds)
    best = pick_best(scores)  # calling a task waits for its value
    model = refit.submit(best["config"], splits)
    return {
        "best_config": best["config"],
        "cv_accuracy": best["cv_accuracy"],
        "val_accuracy": best["val_accuracy"],
        "test_accuracy": score_test(model, splits),
        "configurations": len(scores),
        "model_step": model.key,
    }


def _store_location(client: keel.Client) -> str:
    from sqlalchemy.engine import make_url

    return make_url(client.store.url).render_as_string(hide_password=True)


def main() -> int:
    print(f"keel demo: sweeping {len(sweep_space())} classifiers over the digits data set...")
    started = time.perf_counter()
    handle = keel.run(digits)
    elapsed = time.perf_counter() - started
    client = keel.Client()
    run = client.run(handle.id)
    counts = Counter(step.status for step in run.steps)
    print()
    print(f"run {run.id}: {run.status} in {elapsed:.1f} s")
    print(f"store: {_store_location(client)}")
    print(
        f"steps: {len(run.steps)} ({counts['SUCCEEDED']} ran, {counts['CACHED']} from cache"
        + (f", {counts['FAILED']} failed" if counts["FAILED"] else "")
        + ")"
    )
    if run.status != "SUCCEEDED":
        print(f"error: {run.error_type}: {run.error_message}", file=sys.stderr)
        print(f"see `keel runs show {run.id}`; continue with `keel resume {run.id}`")
        return 1
    result = handle.result()
    model_step = run.step(result["model_step"])
    print(f"configurations tried: {result['configurations']}")
    print(
        f"best configuration: {result['best_config']} "
        f"(validation {result['val_accuracy']:.4f}, CV {result['cv_accuracy']:.4f})"
    )
    print(f"test accuracy: {result['test_accuracy']:.4f}")
    print(
        f"model: output of step {model_step.key} "
        f"({model_step.output_type}, {model_step.serializer}, {model_step.output_size} bytes)"
    )
    champion = keel.models.get_version(MODEL_NAME, ALIAS)
    print(
        f"registered: {MODEL_NAME} version {champion.version}, alias {ALIAS!r}"
        + (
            " (the same model as the last run: not registered again)"
            if model_step.status == "CACHED"
            else ""
        )
    )
    # Load the champion back, as any other program would, and check it on the test set.
    loaded = keel.load_model(f"models:/{MODEL_NAME}@{ALIAS}")
    splits = run.step("split").output()
    accuracy = float(np.mean(loaded.predict(splits["X_test"]) == splits["y_test"]))
    print(f"champion loaded back: test accuracy {accuracy:.4f}")
    print()
    print("Load it anywhere:")
    print(f'  model = keel.load_model("models:/{MODEL_NAME}@{ALIAS}")')
    print("or serve it over HTTP (MLflow's scoring protocol, following the alias):")
    print(f"  keel serve models:/{MODEL_NAME}@{ALIAS} --port 8080")
    print()
    print("Inspect the run:")
    print(f"  keel runs show {run.id}")
    print(f"  keel logs {run.id} pick_best")
    print(f"  keel cache explain {run.id} {model_step.key}")
    print(f"  keel models show {MODEL_NAME}")
    print(f"  keel models lineage {MODEL_NAME}/{champion.version}")
    print(
        f"  python -c \"import keel; print(keel.Client().run('{run.id}').step('refit').output())\""
    )
    print("Run it again (make demo) and every step is served from the cache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
