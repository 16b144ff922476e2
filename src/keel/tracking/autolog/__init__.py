"""`keel.autolog()`: record training calls of ML frameworks without logging code.

    keel.autolog()                       # every installed framework
    keel.autolog(frameworks=["sklearn"]) # only scikit-learn
    keel.autolog(disable=True)           # put every patched method back

Integrations: scikit-learn (`sklearn`) and LightGBM (`lightgbm`). Others plug in
through `register` (see `keel.tracking.autolog.base`). What each records is in
docs/autolog.md.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from keel.errors import TrackingError
from keel.tracking.autolog.base import (
    AutologConfig,
    Integration,
    integrations,
    register,
)
from keel.tracking.autolog.lightgbm import LightGBMAutolog
from keel.tracking.autolog.sklearn import SklearnAutolog

__all__ = ["AutologConfig", "Integration", "autolog", "enabled", "register"]

register(SklearnAutolog())
register(LightGBMAutolog())

_lock = threading.Lock()
_enabled: dict[str, AutologConfig] = {}


def autolog(
    disable: bool = False,
    log_models: bool = True,
    log_input_examples: bool = False,
    max_tuning_runs: int | None = 50,
    frameworks: Iterable[str] | None = None,
) -> list[str]:
    """Turn automatic logging on (or off, with `disable=True`) for ML frameworks.

    Once on, each outermost training call (a scikit-learn `fit`, a `lightgbm.train`)
    records params, metrics and, with `log_models`, the trained model, into the run of
    the code that calls it: the step, the workflow body, the innermost
    `keel.start_run`, or else the run keel starts on demand. `log_input_examples`
    stores the first rows of the training input with each model (its signature is
    inferred from them either way). `max_tuning_runs` caps the nested runs a
    hyperparameter search creates (the best candidates by rank; None for all).

    `frameworks` names the integrations to change (default: every registered one
    whose library is installed). Naming one that is not installed is an error.
    Returns the names of the integrations changed. Autolog patches classes in this
    process: with the process executor, call it in the task's module or the task.
    """
    if max_tuning_runs is not None and (
        isinstance(max_tuning_runs, bool)
        or not isinstance(max_tuning_runs, int)
        or max_tuning_runs < 0
    ):
        raise TrackingError(
            f"max_tuning_runs must be a whole number >= 0 or None, got {max_tuning_runs!r}"
        )
    known = integrations()
    if frameworks is None:
        chosen = [i for i in known.values() if disable or i.is_available()]
    else:
        names = [frameworks] if isinstance(frameworks, str) else list(frameworks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TrackingError(
                f"no autolog integration named {', '.join(map(repr, unknown))}",
                hint=f"Known: {', '.join(sorted(known))}; add one with "
                "keel.tracking.autolog.register(...)",
            )
        chosen = [known[n] for n in names]
        missing = [i.name for i in chosen if not i.is_available()]
        if missing and not disable:
            raise TrackingError(
                f"cannot autolog {', '.join(missing)}: not installed",
                hint=f"pip install {' '.join(missing)}",
            )
    config = AutologConfig(
        log_models=bool(log_models),
        log_input_examples=bool(log_input_examples),
        max_tuning_runs=max_tuning_runs,
    )
    with _lock:
        for integration in chosen:
            if disable:
                integration.disable()
                _enabled.pop(integration.name, None)
            else:
                integration.enable(config)
                _enabled[integration.name] = config
    return [i.name for i in chosen]


def enabled() -> dict[str, AutologConfig]:
    """The integrations autolog is on for, with their config."""
    with _lock:
        return dict(_enabled)
