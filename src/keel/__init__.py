"""keel: durable workflows, execution from a laptop to a cluster, and the ML
application layer, on one store.

    import keel

    @keel.task(retries=2, cache=True)
    def square(x: int) -> int:
        return x * x

    @keel.workflow
    def total(n: int = 10) -> int:
        return sum(keel.gather(square.map(range(n))))

    keel.run(total, n=100).result()

Heavy modules (SQLAlchemy, pydantic, the engine) load on first use, so
`import keel` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keel.errors import (
    Cancelled,
    KeelError,
    NonDeterminismError,
    ParameterError,
    RunFailedError,
    ScheduleError,
    SignalTimeoutError,
    StepTimeoutError,
    TrackingError,
)
from keel.sdk.context import StepContext, context
from keel.sdk.definitions import Resources, Task, Workflow, task, workflow
from keel.sdk.durable import sleep, wait_for_signal
from keel.sdk.futures import StepFuture, gather, wait

if TYPE_CHECKING:
    from keel.client import Attempt, Client, Run, Step
    from keel.engine.api import RunHandle, cancel, resume, retry, run, signal, submit
    from keel.scheduler import schedules as schedules_module
    from keel.scheduler import triggers as triggers_module
    from keel.scheduler.backfill import Backfill, backfill
    from keel.scheduler.scheduler import Scheduler
    from keel.scheduler.triggers import fire_trigger
    from keel.sdk.schedule import Schedule
    from keel.serving.batch import batch_predict
    from keel.serving.log_reader import inference_log
    from keel.serving.runner import serve

    schedules = schedules_module
    triggers = triggers_module
    from keel.store.serializers import register_serializer
    from keel.tracking import registry as models
    from keel.tracking.active import ActiveRun, active_run, set_experiment, start_run
    from keel.tracking.autolog import autolog
    from keel.tracking.log import (
        log_artifact,
        log_dict,
        log_figure,
        log_metric,
        log_metrics,
        log_param,
        log_params,
        log_table,
        log_text,
        set_tag,
        set_tags,
    )
    from keel.tracking.models import load_model, log_model
    from keel.tracking.registry import register_model
    from keel.tracking.search import search_runs

__version__ = "0.1.0"

__all__ = [
    # defining work
    "task",
    "workflow",
    "Task",
    "Workflow",
    "Resources",
    # inside a workflow
    "StepFuture",
    "wait",
    "gather",
    "context",
    "StepContext",
    "sleep",
    "wait_for_signal",
    # running
    "run",
    "resume",
    "retry",
    "cancel",
    "submit",
    "signal",
    "RunHandle",
    # scheduling
    "Schedule",
    "schedules",
    "backfill",
    "Backfill",
    "triggers",
    "fire_trigger",
    "Scheduler",
    # tracking
    "log_param",
    "log_params",
    "log_metric",
    "log_metrics",
    "set_tag",
    "set_tags",
    "log_artifact",
    "log_text",
    "log_dict",
    "log_figure",
    "log_table",
    "start_run",
    "active_run",
    "set_experiment",
    "ActiveRun",
    "search_runs",
    "autolog",
    # model registry
    "log_model",
    "register_model",
    "load_model",
    "models",
    # serving
    "batch_predict",
    "serve",
    "inference_log",
    # reading past runs
    "Client",
    "Run",
    "Step",
    "Attempt",
    # extending
    "register_serializer",
    # errors
    "KeelError",
    "ParameterError",
    "NonDeterminismError",
    "RunFailedError",
    "StepTimeoutError",
    "SignalTimeoutError",
    "TrackingError",
    "ScheduleError",
    "Cancelled",
]

_LAZY = {
    "run": "keel.engine.api",
    "resume": "keel.engine.api",
    "retry": "keel.engine.api",
    "cancel": "keel.engine.api",
    "submit": "keel.engine.api",
    "signal": "keel.engine.api",
    "RunHandle": "keel.engine.api",
    "Schedule": "keel.sdk.schedule",
    "schedules": "keel.scheduler.schedules",
    "backfill": "keel.scheduler.backfill",
    "Backfill": "keel.scheduler.backfill",
    "triggers": "keel.scheduler.triggers",
    "fire_trigger": "keel.scheduler.triggers",
    "Scheduler": "keel.scheduler.scheduler",
    "Client": "keel.client",
    "Run": "keel.client",
    "Step": "keel.client",
    "Attempt": "keel.client",
    "register_serializer": "keel.store.serializers",
    **{
        name: "keel.tracking.log"
        for name in (
            "log_param",
            "log_params",
            "log_metric",
            "log_metrics",
            "set_tag",
            "set_tags",
            "log_artifact",
            "log_text",
            "log_dict",
            "log_figure",
            "log_table",
        )
    },
    **{
        name: "keel.tracking.active"
        for name in ("start_run", "active_run", "set_experiment", "ActiveRun")
    },
    "search_runs": "keel.tracking.search",
    "autolog": "keel.tracking.autolog",
    "log_model": "keel.tracking.models",
    "load_model": "keel.tracking.models",
    "register_model": "keel.tracking.registry",
    "models": "keel.tracking.registry",
    "batch_predict": "keel.serving.batch",
    "serve": "keel.serving.runner",
    "inference_log": "keel.serving.log_reader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keel' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
