"""Read past runs, in the spirit of Metaflow's Client API.

client = keel.Client()
for run in client.runs(workflow="train", status="FAILED"):
    print(run.id, run.status, [s.key for s in run.steps])
client.run(run_id).step("fit-3").output()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from keel.errors import FIX_NEW_RUN, FIX_RESUME, RunFailedError, StepNotFoundError, fix_for
from keel.status import RunStatus
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store
from keel.store.values import StoredValue


@dataclass(frozen=True)
class RunData:
    """What was tracked on a run or step: params (text), latest metrics, tags."""

    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


class _Tracked:
    """Tracking reads shared by runs (seq -1) and steps (their position)."""

    _store: MetadataStore
    _tracked_id: tuple[str, int]
    _row: Any

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, None while it runs or if it never started."""
        if self._row.started_at is None or self._row.ended_at is None:
            return None
        return float(self._row.ended_at - self._row.started_at)

    @property
    def data(self) -> RunData:
        from keel.store import tracking

        run_id, seq = self._tracked_id
        return RunData(
            params=tracking.load_params(self._store, run_id, seq),
            metrics=tracking.load_latest_metrics(self._store, run_id, seq),
            tags=tracking.load_tags(self._store, run_id, seq),
        )

    def metric_history(self, key: str) -> list[Any]:
        """Every recorded point of a metric: `.value`, `.step`, `.timestamp`."""
        from keel.store import tracking

        run_id, seq = self._tracked_id
        return list(tracking.load_metric_history(self._store, run_id, seq, key))

    def logged_artifacts(self) -> list[Any]:
        """Files logged with keel.log_artifact / log_text / log_dict / ...: `.path`, `.size`."""
        from keel.store import tracking

        run_id, seq = self._tracked_id
        return list(tracking.load_logged_artifacts(self._store, run_id, seq))

    def read_artifact(self, path: str) -> bytes:
        """The bytes of a logged artifact, by its path in the run."""
        from keel.store.artifacts import artifact_store

        for item in self.logged_artifacts():
            if item.path == path:
                return artifact_store(self._store.config.artifacts_url).get(item.hash)
        run_id, _ = self._tracked_id
        raise StepNotFoundError(
            f"no artifact {path!r} was logged here",
            run_id=run_id,
            hint="List them with .logged_artifacts()",
        )


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def _stored(row: Any, prefix: str) -> StoredValue | None:
    from keel.engine.run import stored_from_row

    return stored_from_row(row, prefix)


@dataclass(frozen=True)
class Attempt:
    run_id: str
    seq: int
    number: int
    status: str
    started_at: datetime | None
    ended_at: datetime | None
    error_type: str | None
    error_message: str | None
    traceback: str | None
    _store: MetadataStore

    def logs(self) -> str:
        return "".join(r.text for r in self._store.load_logs(self.run_id, self.seq, self.number))


class Step(_Tracked):
    """One recorded step of a run (and a nested tracked run: `.data`)."""

    def __init__(self, row: Any, store: MetadataStore) -> None:
        self._row = row
        self._store = store
        self._tracked_id = (row.run_id, row.seq)
        self.run_id: str = row.run_id
        self.seq: int = row.seq
        self.key: str = row.key
        self.task: str = row.task
        self.kind: str = row.kind
        self.status: str = row.status
        self.started_at = _when(row.started_at)
        self.ended_at = _when(row.ended_at)
        self.error_type: str | None = row.error_type
        self.error_message: str | None = row.error_message
        self.cached_from: str | None = row.cached_from
        self.child_run_id: str | None = row.child_run_id
        self.deps: list[int] = json.loads(row.deps) if row.deps else []
        self.output_type: str | None = row.output_type
        self.output_size: int | None = row.output_size
        self.output_hash: str | None = row.output_hash
        self.output_ref: str | None = row.output_ref

    def __repr__(self) -> str:
        return f"<Step {self.key} {self.status}>"

    @cached_property
    def attempts(self) -> list[Attempt]:
        return [
            Attempt(
                run_id=r.run_id,
                seq=r.seq,
                number=r.attempt,
                status=r.status,
                started_at=_when(r.started_at),
                ended_at=_when(r.ended_at),
                error_type=r.error_type,
                error_message=r.error_message,
                traceback=r.traceback,
                _store=self._store,
            )
            for r in self._store.load_attempts(self.run_id, self.seq)
        ]

    @property
    def cache(self) -> dict[str, Any] | None:
        """The parts of the step's cache key (None for tasks without cache=True)."""
        if self._row.cache_info is None:
            return None
        info: dict[str, Any] = json.loads(self._row.cache_info)
        info["key"] = self._row.cache_key
        return info

    def has_output(self) -> bool:
        return self._row.output_serializer is not None

    def output(self) -> Any:
        """The step's recorded output, read back from the store."""
        stored = _stored(self._row, "output")
        if stored is None:
            raise StepNotFoundError(
                f"step {self.key} has no recorded output (status {self.status})",
                run_id=self.run_id,
                step_key=self.key,
            )
        return stored.load(self._store.config.artifacts_url)

    def output_bytes(self) -> bytes:
        stored = _stored(self._row, "output")
        if stored is None:
            raise StepNotFoundError(
                f"step {self.key} has no recorded output", run_id=self.run_id, step_key=self.key
            )
        return stored.read_bytes(self._store.config.artifacts_url)

    @property
    def serializer(self) -> str | None:
        return self._row.output_serializer  # type: ignore[no-any-return]

    def logs(self, attempt: int | None = None) -> str:
        return "".join(r.text for r in self._store.load_logs(self.run_id, self.seq, attempt))

    def consumers(self) -> list[Step]:
        """Steps of this run that took this step's output as an input (lineage)."""
        return [Step(r, self._store) for r in self._store.steps_consuming(self.run_id, self.seq)]


class Run(_Tracked):
    """One recorded run: of a workflow, or opened with keel.start_run (`kind`)."""

    def __init__(self, row: Any, store: MetadataStore) -> None:
        self._row = row
        self._store = store
        self._tracked_id = (row.id, -1)
        self.kind: str = row.kind
        self.run_name: str | None = row.run_name
        self.experiment_id: int | None = row.experiment_id
        self.user: str | None = row.user
        self.id: str = row.id
        self.workflow: str = row.workflow
        self.status: str = row.status
        self.params: dict[str, Any] = json.loads(row.params) if row.params else {}
        self.tags: dict[str, str] = json.loads(row.tags) if row.tags else {}
        # Each task's options as the run used them: retries, timeout, resources, tags...
        self.tasks: dict[str, dict[str, Any]] = json.loads(row.tasks) if row.tasks else {}
        self.created_at = _when(row.created_at)
        self.started_at = _when(row.started_at)
        self.ended_at = _when(row.ended_at)
        self.parent_id: str | None = row.parent_id
        self.retry_of: str | None = row.retry_of
        self.entrypoint: str | None = row.entrypoint
        self.error_type: str | None = row.error_type
        self.error_message: str | None = row.error_message
        self.traceback: str | None = row.traceback

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.workflow} {self.status}>"

    @cached_property
    def steps(self) -> list[Step]:
        return [Step(r, self._store) for r in self._store.load_steps(self.id)]

    def step(self, key: str | int) -> Step:
        """A step by key (`train-3`), position (`3`) or task name when it is unique."""
        steps = self.steps
        text = str(key)
        for s in steps:
            if s.key == text:
                return s
        if text.isdigit():
            for s in steps:
                if s.seq == int(text):
                    return s
        named = [s for s in steps if s.task == text]
        if len(named) == 1:
            return named[0]
        if named:
            raise StepNotFoundError(
                f"task {text!r} ran as {len(named)} steps in run {self.id}",
                run_id=self.id,
                hint=f"Name one: {', '.join(s.key for s in named[:5])}"
                + (" ..." if len(named) > 5 else ""),
            )
        raise StepNotFoundError(
            f"run {self.id} has no step {text!r}",
            run_id=self.id,
            hint="See the steps with `keel runs show " + self.id + "`",
        )

    def children(self) -> list[Run]:
        return [Run(r, self._store) for r in self._store.list_runs(parent_id=self.id, limit=None)]

    def _fix(self) -> str:
        """What continues or repairs a run that did not succeed (see errors.fix_for)."""
        if self.status != RunStatus.FAILED:
            return f"continue it with `keel resume {self.id}`"
        fix = fix_for(self.error_type, self.error_message)
        if fix == FIX_RESUME:
            return f"once the environment is fixed, continue it with `keel resume {self.id}`"
        if fix == FIX_NEW_RUN:
            return "start a new run with corrected parameters"
        return f"fix the code, then `keel retry {self.id}`"

    def result(self) -> Any:
        """The workflow's return value; raises RunFailedError unless the run succeeded."""
        if self.status != RunStatus.SUCCEEDED:
            raise RunFailedError(
                f"run {self.id} of workflow {self.workflow} is {self.status}"
                + (f": {self.error_type}: {self.error_message}" if self.error_type else ""),
                run_id=self.id,
                error_type=self.error_type,
                traceback=self.traceback,
                hint=f"See `keel runs show {self.id}`; {self._fix()}",
            )
        stored = _stored(self._row, "result")
        return None if stored is None else stored.load(self._store.config.artifacts_url)


class Client:
    """Read access to recorded runs. Uses KEEL_DB_URL / KEEL_HOME unless told otherwise."""

    def __init__(self, db_url: str | None = None, *, store: MetadataStore | None = None) -> None:
        self.store = store or open_store(StoreConfig.from_env(db_url=db_url))

    def runs(
        self,
        workflow: str | None = None,
        status: str | list[str] | None = None,
        *,
        limit: int | None = 100,
        include_children: bool = False,
    ) -> list[Run]:
        """Runs, newest first."""
        from keel.store.recorder import flush_pending

        flush_pending(self.store)
        rows = self.store.list_runs(
            workflow=workflow, status=status, top_level=not include_children, limit=limit
        )
        return [Run(r, self.store) for r in rows]

    def experiments(self) -> list[Any]:
        """Experiments (`.id`, `.name`, `.tags`), oldest first."""
        from keel.store.tracking import list_experiments

        return list_experiments(self.store)

    def run(self, run_id: str) -> Run:
        from keel.store.recorder import flush_pending

        flush_pending(self.store)
        rid = self.store.resolve_run_id(run_id)
        row = self.store.get_run(rid)
        assert row is not None
        return Run(row, self.store)
