"""Autolog for LightGBM: every outermost `lightgbm.train` is a tracked record.

`enable` replaces `lightgbm.train` (also as the scikit-learn API's `LGBMClassifier`
and `LGBMRegressor` call it) with a version that adds a keel callback. It records:

- params: the `params` dict, `num_boost_round` and the names of the validation sets;
- each iteration's evaluation results as metrics named `<data set>-<metric>`
  (e.g. `valid_0-multi_logloss`), with the iteration as the metric's step;
- `best_iteration` (with early stopping) and `stopped_iteration` (how many ran);
- the feature importances (split counts and gain) as `feature_importance.json`;
- the trained Booster as a model (`keel.log_model`).

Training inside a scikit-learn fit that autolog records (a Pipeline with an
`LGBMClassifier` step) is part of that fit's record, not a second one.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from keel.tracking.autolog.base import (
    AutologConfig,
    PatchingIntegration,
    input_example,
    log_fitted_model,
    log_metrics_safely,
    log_params_safely,
    logger,
    record_for,
    safely,
    stringify,
    training,
)

# Where `train` is looked up at call time: the package, its engine, the sklearn API.
_TRAIN_OWNERS = ("lightgbm", "lightgbm.engine", "lightgbm.sklearn")


class LightGBMAutolog(PatchingIntegration):
    """The LightGBM integration (registered as "lightgbm")."""

    name = "lightgbm"
    module = "lightgbm"

    def _install(self, config: AutologConfig) -> None:
        import importlib

        train = importlib.import_module("lightgbm.engine").train
        patched = self._wrap_train(train)
        for owner in _TRAIN_OWNERS:
            module = importlib.import_module(owner)
            if getattr(module, "train", None) is train:
                self._patches.replace(module, "train", lambda _: patched)

    def _wrap_train(self, train: Callable[..., Any]) -> Callable[..., Any]:
        integration = self
        signature = inspect.signature(train)

        @functools.wraps(train)
        def patched_train(*args: Any, **kwargs: Any) -> Any:
            config = integration.config
            if config is None:
                return train(*args, **kwargs)
            with training() as outermost:
                if not outermost:
                    return train(*args, **kwargs)
                try:
                    bound = signature.bind(*args, **kwargs)
                except TypeError:
                    return train(*args, **kwargs)  # let lightgbm report the bad call
                with record_for("lightgbm.train"):
                    return _train_and_log(train, bound, config)

        return patched_train


class _IterationLogger:
    """A LightGBM callback: each iteration's evaluation results as metrics."""

    order = 20  # after LightGBM's own logging (10), before early stopping (30) may stop
    before_iteration = False

    def __init__(self) -> None:
        self.broken = False
        self.iterations = 0

    def __call__(self, env: Any) -> None:
        self.iterations = int(env.iteration) - int(env.begin_iteration) + 1
        if self.broken or not env.evaluation_result_list:
            return
        try:
            results = env.evaluation_result_list
            metrics = {f"{item[0]}-{item[1]}": float(item[2]) for item in results}
            from keel.tracking.log import log_metrics

            log_metrics(metrics, step=int(env.iteration))
        except Exception as exc:
            self.broken = True
            logger.warning(
                "keel autolog stops logging LightGBM's metrics: %s: %s", type(exc).__name__, exc
            )


def _train_and_log(
    train: Callable[..., Any], bound: inspect.BoundArguments, config: AutologConfig
) -> Any:
    arguments = bound.arguments
    params = dict(arguments.get("params") or {})
    with safely("log LightGBM's params"):
        logged: dict[str, Any] = {key: stringify(value) for key, value in params.items()}
        logged["num_boost_round"] = arguments.get("num_boost_round", 100)
        names = arguments.get("valid_names")
        if names:
            logged["valid_names"] = ", ".join(map(str, names))
        log_params_safely(logged)
    callback = _IterationLogger()
    arguments["callbacks"] = [*(arguments.get("callbacks") or []), callback]
    booster = train(*bound.args, **bound.kwargs)
    with safely("log the trained LightGBM booster"):
        _log_booster(booster, arguments.get("train_set"), callback.iterations, config)
    return booster


def _log_booster(booster: Any, train_set: Any, iterations: int, config: AutologConfig) -> None:
    from keel.tracking.log import log_dict

    # After early stopping the returned booster keeps the best iteration's trees only;
    # the callback counted how many iterations really ran.
    summary: dict[str, float] = {"stopped_iteration": float(iterations)}
    best = getattr(booster, "best_iteration", 0)
    if best and best > 0:
        summary["best_iteration"] = float(best)
    log_metrics_safely(summary)
    with safely("log the feature importances"):
        names = booster.feature_name()
        importance = {
            kind: dict(zip(names, booster.feature_importance(kind).tolist(), strict=True))
            for kind in ("split", "gain")
        }
        log_dict(importance, "feature_importance.json")
    data = getattr(train_set, "data", None)
    example = input_example(data) if data is not None and not isinstance(data, str) else None
    log_fitted_model(booster, config, example)
