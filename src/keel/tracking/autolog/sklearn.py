"""Autolog for scikit-learn: every outermost `fit` is a tracked record.

`enable` replaces `fit` on every estimator class scikit-learn lists
(`sklearn.utils.all_estimators()`) plus Pipeline and the hyperparameter searches;
`disable` puts the originals back. A fit records into the tracked run of the code
that calls it (a step, a workflow body, a `keel.start_run`, else the run keel starts
on demand):

- params: `get_params(deep=True)`, so a Pipeline's or a search's nested settings
  appear as `step__param`; estimators inside are named by class; values are text,
  cut at `MAX_PARAM_CHARS`;
- training metrics, on the training data: `training_score` (the estimator's own
  `score`), for classifiers accuracy, weighted precision / recall / F1 and log-loss
  (when `predict_proba` exists), for regressors MSE, RMSE, MAE and R²;
- the fitted model (`keel.log_model`, signature from the training input);
- for GridSearchCV / RandomizedSearchCV, one nested run per candidate (the best
  `max_tuning_runs` by rank) with its params and CV metrics, the best params as
  `best_<param>` and `best_cv_score` on the search's run, the refitted best estimator
  as a second model and `cv_results.json`.

Only the outermost fit is a record: the steps of a Pipeline, the clones fitted by a
search or by `cross_val_score` / `cross_validate` / `cross_val_predict` and the
refit are its internals. The first fit in a run records into that run; each later
fit in the same run gets a nested run of its own, named after the estimator class,
so that two models fitted in one step never mix their params.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Mapping
from typing import Any

from keel.tracking.autolog.base import (
    AutologConfig,
    PatchingIntegration,
    child_run,
    input_example,
    log_fitted_model,
    log_metrics_safely,
    log_params_safely,
    logger,
    nested_training,
    original,
    record_for,
    safely,
    training,
)

# Internal helpers of sklearn.model_selection that fit throw-away clones; they are
# looked up as module globals at call time, so patching them covers cross_val_score
# however the user imported it.
_CLONE_FITTERS = {
    "sklearn.model_selection._validation": (
        "_fit_and_score",
        "_fit_and_predict",
        "_permutation_test_score",
        "_incremental_fit_estimator",
    ),
    "sklearn.model_selection._search": ("_fit_and_score",),
}

_CV_PREFIXES = ("mean_", "std_", "rank_")


class SklearnAutolog(PatchingIntegration):
    """The scikit-learn integration (registered as "sklearn")."""

    name = "sklearn"
    module = "sklearn"

    def _install(self, config: AutologConfig) -> None:
        for cls in _estimator_classes():
            self._patches.replace(cls, "fit", self._wrap_fit)
        import importlib

        for module_name, names in _CLONE_FITTERS.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name in names:
                if hasattr(module, name):
                    self._patches.replace(module, name, _internal)

    def _wrap_fit(self, fit: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        @functools.wraps(fit)
        def patched_fit(estimator: Any, *args: Any, **kwargs: Any) -> Any:
            config = integration.config
            if config is None:
                return fit(estimator, *args, **kwargs)
            with training() as outermost:
                if not outermost:
                    return fit(estimator, *args, **kwargs)
                with record_for(type(estimator).__name__):
                    result = fit(estimator, *args, **kwargs)
                    with safely(f"log the fit of {type(estimator).__name__}"):
                        _log_fit(estimator, args, kwargs, config)
                    return result

        return patched_fit


def _internal(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with nested_training():
            return function(*args, **kwargs)

    return wrapper


def _estimator_classes() -> list[type]:
    from sklearn.model_selection import GridSearchCV, RandomizedSearchCV
    from sklearn.pipeline import Pipeline
    from sklearn.utils import all_estimators

    classes: list[type] = [Pipeline, GridSearchCV, RandomizedSearchCV]
    with safely("list scikit-learn's estimators"):
        classes += [cls for _, cls in all_estimators() if cls not in classes]
    # A plain function only: a `fit` behind a descriptor (available_if) is left alone.
    return [cls for cls in classes if isinstance(_defined_fit(cls), types.FunctionType)]


def _defined_fit(cls: type) -> object:
    for base in cls.__mro__:
        if "fit" in vars(base):
            return original(vars(base)["fit"])
    return None


# -- what a fit records ----------------------------------------------------------------


def _fit_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    x = args[0] if args else kwargs.get("X")
    y = args[1] if len(args) > 1 else kwargs.get("y", kwargs.get("Y"))
    return x, y, kwargs.get("sample_weight")


def _log_fit(
    estimator: Any, args: tuple[Any, ...], kwargs: dict[str, Any], config: AutologConfig
) -> None:
    from keel.tracking.log import set_tags

    x, y, weight = _fit_inputs(args, kwargs)
    cls = type(estimator)
    with safely("set the estimator tags"):
        set_tags(
            {
                "autolog.estimator": cls.__name__,
                "autolog.estimator_class": f"{cls.__module__}.{cls.__qualname__}",
            }
        )
    log_params_safely(estimator_params(estimator))
    search = _is_search(estimator)
    if search:
        with safely("log the search's results"):
            _log_search(estimator, config)
    if x is not None:
        with safely("compute training metrics"):
            log_metrics_safely(training_metrics(estimator, x, y, weight))
    example = input_example(x)
    log_fitted_model(estimator, config, example)
    if search and hasattr(estimator, "best_estimator_"):
        log_fitted_model(estimator.best_estimator_, config, example, name="best_estimator")


def estimator_params(estimator: Any) -> dict[str, Any]:
    """`get_params(deep=True)` made readable: estimators by class name, callables by
    qualified name, a Pipeline's `steps` as `name: Class` pairs."""
    params: dict[str, Any] = {}
    for key, value in estimator.get_params(deep=True).items():
        params[key] = _param_text(value)
    return params


def _param_text(value: Any) -> Any:
    if hasattr(value, "get_params") and hasattr(value, "fit"):
        return type(value).__name__
    if isinstance(value, list | tuple) and value and all(_is_named_step(v) for v in value):
        return ", ".join(f"{name}: {_param_text(step)}" for name, step, *_ in value)
    if isinstance(value, type):
        return value.__name__
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '') or ''}.{value.__qualname__}".lstrip(".")
    return value


def _is_named_step(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) >= 2 and isinstance(value[0], str)


def _is_search(estimator: Any) -> bool:
    from sklearn.model_selection._search import BaseSearchCV

    return isinstance(estimator, BaseSearchCV) and hasattr(estimator, "cv_results_")


def training_metrics(estimator: Any, x: Any, y: Any, weight: Any = None) -> dict[str, float]:
    """Metrics of the fitted estimator on its training data; those that do not apply
    (a transformer has no `score`, a classifier without `predict_proba` no log-loss)
    are left out."""
    from sklearn import metrics
    from sklearn.base import is_classifier, is_regressor

    found: dict[str, float] = {}

    def add(name: str, compute: Callable[[], Any]) -> None:
        try:
            value = float(compute())
        except Exception as exc:
            logger.debug("keel autolog: no %s for %s: %s", name, type(estimator).__name__, exc)
            return
        found[name] = value

    if hasattr(estimator, "score"):
        # Only pass what the fit had: a search's `score` refuses sample_weight=None.
        extra = {} if weight is None else {"sample_weight": weight}
        if y is None:
            add("training_score", lambda: estimator.score(x, **extra))
        else:
            add("training_score", lambda: estimator.score(x, y, **extra))
    if y is None or not hasattr(estimator, "predict"):
        return found
    if is_classifier(estimator):
        predicted = estimator.predict(x)
        add("training_accuracy", lambda: metrics.accuracy_score(y, predicted, sample_weight=weight))
        for name, score in (
            ("precision", metrics.precision_score),
            ("recall", metrics.recall_score),
            ("f1", metrics.f1_score),
        ):
            add(
                f"training_{name}",
                functools.partial(
                    score, y, predicted, average="weighted", zero_division=0, sample_weight=weight
                ),
            )
        if hasattr(estimator, "predict_proba"):
            add(
                "training_log_loss",
                lambda: metrics.log_loss(
                    y,
                    estimator.predict_proba(x),
                    sample_weight=weight,
                    labels=getattr(estimator, "classes_", None),
                ),
            )
    elif is_regressor(estimator):
        predicted = estimator.predict(x)
        add("training_mse", lambda: metrics.mean_squared_error(y, predicted, sample_weight=weight))
        if "training_mse" in found:
            found["training_rmse"] = math.sqrt(found["training_mse"])
        add("training_mae", lambda: metrics.mean_absolute_error(y, predicted, sample_weight=weight))
        add("training_r2", lambda: metrics.r2_score(y, predicted, sample_weight=weight))
    return found


def _log_search(search: Any, config: AutologConfig) -> None:
    """One nested run per candidate (the best `max_tuning_runs` by rank), then the
    best params and score on the search's own run."""
    from keel.tracking.log import log_dict

    results: Mapping[str, Any] = search.cv_results_
    candidates: list[dict[str, Any]] = list(results["params"])
    ranks = results.get(_rank_key(search, results))
    order = list(range(len(candidates)))
    if ranks is not None:
        order.sort(key=lambda i: (int(ranks[i]), i))
    limit = len(order) if config.max_tuning_runs is None else max(config.max_tuning_runs, 0)
    chosen = sorted(order[:limit])
    if len(chosen) < len(order):
        logger.info(
            "keel autolog: logging the best %d of %d candidates (max_tuning_runs)",
            len(chosen),
            len(order),
        )
    prefix = type(search).__name__
    for index in chosen:
        name = f"{prefix}-candidate-{index}"
        with (
            safely(f"log candidate {index}"),
            child_run(name, {"autolog.candidate": str(index)}),
        ):
            log_params_safely({k: _param_text(v) for k, v in candidates[index].items()})
            log_metrics_safely(_candidate_metrics(results, index))
    if hasattr(search, "best_params_"):
        log_params_safely({f"best_{k}": _param_text(v) for k, v in search.best_params_.items()})
    if hasattr(search, "best_score_"):
        log_metrics_safely({"best_cv_score": float(search.best_score_)})
    with safely("log cv_results.json"):
        log_dict(_jsonable(results), "cv_results.json")


def _rank_key(search: Any, results: Mapping[str, Any]) -> str:
    refit = getattr(search, "refit", True)
    if isinstance(refit, str) and f"rank_test_{refit}" in results:
        return f"rank_test_{refit}"
    if "rank_test_score" in results:
        return "rank_test_score"
    return next((k for k in results if k.startswith("rank_test_")), "rank_test_score")


def _candidate_metrics(results: Mapping[str, Any], index: int) -> dict[str, float]:
    found: dict[str, float] = {}
    for key, values in results.items():
        if not key.startswith(_CV_PREFIXES):
            continue
        try:
            found[key] = float(values[index])
        except (TypeError, ValueError):
            continue
    return found


def _jsonable(results: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in results.items():
        tolist = getattr(values, "tolist", None)
        items = tolist() if tolist is not None else list(values)
        out[key] = [
            {k: _param_text(v) for k, v in item.items()} if isinstance(item, dict) else item
            for item in items
        ]
    return out
