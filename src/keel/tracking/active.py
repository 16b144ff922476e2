"""Which tracked run a log call belongs to, and `keel.start_run`.

Resolution order: the innermost run opened with `start_run` on this thread, else
the step running on this thread, else the workflow body's run, else a run started
on demand in the current experiment (closed when the process exits), as MLflow does.
"""

from __future__ import annotations

import atexit
import getpass
import os
import socket
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from keel.errors import TrackingError, qualified_name
from keel.ids import new_run_id
from keel.sdk.context import current_runtime, current_step
from keel.status import RunStatus
from keel.store.config import StoreConfig
from keel.store.limits import check_text
from keel.store.metadata import MetadataStore, open_store
from keel.store.recorder import Recorder, recorder_for
from keel.store.tracking import DEFAULT_EXPERIMENT, MAX_NAME_LENGTH, experiment_id


@dataclass(frozen=True, slots=True)
class TrackedRun:
    """Where a log call lands: a run (seq -1) or one of its steps (seq >= 0)."""

    run_id: str
    seq: int
    store: MetadataStore
    recorder: Recorder


class _Local(threading.local):
    stack: list[ActiveRun]
    step_key: object = None
    step_run: TrackedRun | None = None

    def __init__(self) -> None:
        self.stack = []


_local = _Local()
_default_experiment: str | None = None
_auto_run: ActiveRun | None = None
_auto_lock = threading.Lock()


def _store_for(db_url: str | None, artifacts_url: str | None) -> MetadataStore:
    return open_store(StoreConfig.from_env(db_url=db_url, artifacts_url=artifacts_url))


def current(*, start: bool = True) -> TrackedRun | None:
    """The tracked run for a log call made here (starting one if `start`)."""
    if _local.stack:
        return _local.stack[-1].tracked
    step = current_step()
    if step is not None:
        if step.ephemeral:
            _refuse_unrecorded(start)
            return None
        if _local.step_key is not step:  # one lookup per step, not per call
            store = _store_for(step.db_url, step.artifacts_url)
            seq = step.seq if step.seq is not None else -1
            _local.step_run = TrackedRun(step.run_id, seq, store, recorder_for(store))
            _local.step_key = step
        return _local.step_run
    runtime = current_runtime()
    if runtime is not None:
        if getattr(runtime, "ephemeral", False):
            _refuse_unrecorded(start)
            return None
        store = _store_for(runtime.db_url, runtime.artifacts_url)
        return TrackedRun(runtime.run_id, -1, store, recorder_for(store))
    if not start:
        return None
    return _auto_started().tracked


def _refuse_unrecorded(start: bool) -> None:
    """A logging call (`start`) in an ephemeral run has no run to land in: refused,
    rather than written under a run id that does not exist."""
    if start:
        raise TrackingError(
            "this step runs ephemeral (served without recording): there is no run to log to",
            hint="Serve the workflow in recorded mode (without --ephemeral) to track it",
        )


def unrecorded_store() -> MetadataStore | None:
    """The store an ephemeral step or body reads models from (its server's), if any."""
    where: Any = current_step() or current_runtime()
    if where is None or not getattr(where, "ephemeral", False) or not where.db_url:
        return None
    return _store_for(where.db_url, where.artifacts_url or None)


def _auto_started() -> ActiveRun:
    global _auto_run
    with _auto_lock:
        if _auto_run is None:
            _auto_run = ActiveRun._open(experiment=None, run_name=None, tags=None)
            atexit.register(_close_auto_run)
        return _auto_run


def _close_auto_run() -> None:
    global _auto_run
    if _auto_run is not None:
        _auto_run.end()
        _auto_run = None


def set_experiment(name: str) -> int:
    """Make `name` the experiment of runs opened from now on (created if missing)."""
    if not isinstance(name, str) or not name.strip():
        raise TrackingError(f"an experiment name must be a non-empty string, got {name!r}")
    check_text("experiment name", name, limit=MAX_NAME_LENGTH, field="experiment name")
    global _default_experiment
    _default_experiment = name
    return experiment_id(open_store(), name)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


class ActiveRun:
    """A run opened with `keel.start_run`; use it as a context manager."""

    def __init__(self, tracked: TrackedRun, experiment: str, name: str) -> None:
        self.tracked = tracked
        self.id = tracked.run_id
        self.experiment = experiment
        self.name = name
        self._ended = False

    def __repr__(self) -> str:
        return f"<keel tracked run {self.id} {self.name!r} in {self.experiment!r}>"

    @classmethod
    def _open(
        cls,
        *,
        experiment: str | None,
        run_name: str | None,
        tags: Mapping[str, Any] | None,
        description: str | None = None,
    ) -> ActiveRun:
        parent = current(start=False)
        store = parent.store if parent is not None else open_store()
        if experiment is None:
            experiment = _parent_experiment(parent) or _default_experiment or DEFAULT_EXPERIMENT
        exp_id = experiment_id(store, experiment)
        run_id = new_run_id()
        name = run_name or f"run-{run_id[-6:]}"
        now = time.time()
        store.insert_run(
            {
                "id": run_id,
                "workflow": name,
                "status": str(RunStatus.RUNNING),
                "kind": "tracking",
                "run_name": name,
                "experiment_id": exp_id,
                "parent_id": parent.run_id if parent is not None else None,
                "parent_seq": parent.seq if parent is not None and parent.seq >= 0 else None,
                "created_at": now,
                "started_at": now,
                "cancel_requested": False,
                "user": _user(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        run = cls(TrackedRun(run_id, -1, store, recorder_for(store)), experiment, name)
        if tags:
            from keel.tracking.log import set_tags

            _local.stack.append(run)
            try:
                set_tags(tags)
            finally:
                _local.stack.pop()
        if description:
            from keel.tracking.log import set_tag

            _local.stack.append(run)
            try:
                set_tag("description", description)
            finally:
                _local.stack.pop()
        return run

    def __enter__(self) -> ActiveRun:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.end()
        elif isinstance(exc, KeyboardInterrupt):
            self.end(RunStatus.CANCELLED)
        else:
            self.end(RunStatus.FAILED, exc)

    def end(
        self, status: RunStatus = RunStatus.SUCCEEDED, error: BaseException | None = None
    ) -> None:
        """Close the run: record its status and make everything it logged durable."""
        if self._ended:
            return
        self._ended = True
        if self in _local.stack:
            _local.stack.remove(self)
        values: dict[str, Any] = {"status": str(status), "ended_at": time.time()}
        if error is not None:
            values.update(
                error_type=qualified_name(type(error)),
                error_message=str(error),
                traceback="".join(traceback.format_exception(error)),
            )
        self.tracked.recorder.run_update(self.id, values)
        self.tracked.recorder.flush()
        refused = self.tracked.recorder.take_refused(self.id)
        if refused:
            # A row the database refused (it got past the checks at the call): the run
            # did not record everything it logged, so it did not succeed.
            problem = refused[0].error()
            self.tracked.store.update_run(
                self.id,
                status=str(RunStatus.FAILED),
                error_type=qualified_name(type(problem)),
                error_message=problem.message,
            )
            if status is RunStatus.SUCCEEDED:
                raise problem


def _parent_experiment(parent: TrackedRun | None) -> str | None:
    if parent is None:
        return None
    row = parent.store.get_run(parent.run_id)
    if row is None or row.experiment_id is None:
        return None
    from keel.store.tracking import get_experiment

    found = get_experiment(parent.store, int(row.experiment_id))
    return found.name if found is not None else None


def start_run(
    experiment: str | None = None,
    run_name: str | None = None,
    *,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    nested: bool = True,
) -> ActiveRun:
    """Open a tracked run; `with keel.start_run(experiment="x") as run: ...`.

    Inside another run (a `start_run`, a step or a workflow body) the new run is
    nested under it. `nested=False` refuses that, as a guard against a run left open
    by mistake. The run ends SUCCEEDED, or FAILED with the exception's traceback.
    """
    if run_name is not None and (not isinstance(run_name, str) or len(run_name) > 250):
        raise TrackingError(
            f"run_name must be a string of at most 250 characters, got {run_name!r}"
        )
    if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()):
        raise TrackingError(f"experiment must be a non-empty string, got {experiment!r}")
    if run_name is not None:
        check_text("run_name", run_name, field="run_name")
    if experiment is not None:
        check_text("experiment", experiment, limit=MAX_NAME_LENGTH, field="experiment")
    if tags:
        from keel.tracking.log import check_tags

        check_tags(tags)  # before the run exists: a bad tag leaves no run behind
    if not nested and _local.stack:
        raise TrackingError(
            f"run {_local.stack[-1].id} is still active",
            hint="End it first, or pass nested=True to open a run inside it",
        )
    run = ActiveRun._open(
        experiment=experiment, run_name=run_name, tags=tags, description=description
    )
    _local.stack.append(run)
    return run


def active_run() -> ActiveRun | None:
    """The innermost run opened with `start_run` on this thread, if any."""
    return _local.stack[-1] if _local.stack else None
