"""Lineage of a model version: the run and step that produced it, that run's params
and metrics, and the data (upstream step outputs, followed through `Step.deps`
transitively) that flowed into the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from keel.client import Run, Step
    from keel.store.metadata import MetadataStore
    from keel.store.tracking import LoggedArtifact
    from keel.tracking.registry import ModelVersion


@dataclass(frozen=True)
class DataArtifact:
    """The recorded output of one upstream step."""

    step_key: str
    task: str
    seq: int
    status: str
    hash: str | None
    type: str | None
    size: int | None
    serializer: str | None
    stored: str | None  # "inline" (in the step's row) or "artifact" (in the artifact store)
    inputs: tuple[str, ...]  # keys of the steps whose outputs this step consumed
    logged: tuple[LoggedArtifact, ...] = ()  # files the step logged (tables, plots...)


@dataclass(frozen=True)
class Lineage:
    version: ModelVersion
    run: Run | None = None
    step: Step | None = None
    experiment: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # workflow inputs + logged params
    metrics: dict[str, float] = field(default_factory=dict)  # the run's latest metrics
    step_params: dict[str, str] = field(default_factory=dict)
    step_metrics: dict[str, float] = field(default_factory=dict)
    inputs: list[DataArtifact] = field(default_factory=list)  # nearest first
    logged: list[LoggedArtifact] = field(default_factory=list)  # by the producing step/run

    def to_dict(self) -> dict[str, Any]:
        v = self.version
        return {
            "model": {"name": v.name, "version": v.version, "flavor": v.flavor},
            "run": None
            if self.run is None
            else {
                "id": self.run.id,
                "workflow": self.run.workflow,
                "status": self.run.status,
                "experiment": self.experiment,
            },
            "step": None
            if self.step is None
            else {"key": self.step.key, "task": self.step.task, "status": self.step.status},
            "params": {k: _plain(x) for k, x in self.params.items()},
            "metrics": self.metrics,
            "step_params": self.step_params,
            "step_metrics": self.step_metrics,
            "inputs": [
                {
                    "step": a.step_key,
                    "task": a.task,
                    "hash": a.hash,
                    "type": a.type,
                    "size": a.size,
                    "stored": a.stored,
                    "inputs": list(a.inputs),
                    "logged": [x.path for x in a.logged],
                }
                for a in self.inputs
            ],
            "logged": [{"path": x.path, "hash": x.hash, "size": x.size} for x in self.logged],
        }


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


def build_lineage(store: MetadataStore, version: ModelVersion) -> Lineage:
    from keel.client import Client
    from keel.errors import RunNotFoundError
    from keel.store.tracking import get_experiment, load_logged_artifacts

    if version.run_id is None:
        return Lineage(version)
    try:
        run = Client(store=store).run(version.run_id)
    except RunNotFoundError:
        return Lineage(version)  # the run was deleted; the version still loads
    data = run.data
    experiment = None
    if run.experiment_id is not None:
        found = get_experiment(store, int(run.experiment_id))
        experiment = found.name if found is not None else None
    by_seq = {s.seq: s for s in run.steps}
    step = by_seq.get(version.seq) if version.seq is not None else None
    tracked = (run.id, step.seq if step is not None else -1)
    result = Lineage(
        version,
        run=run,
        step=step,
        experiment=experiment,
        params={**run.params, **data.params},
        metrics=data.metrics,
        logged=load_logged_artifacts(store, *tracked),
    )
    if step is None:
        return result
    step_data = step.data
    result.step_params.update(step_data.params)
    result.step_metrics.update(step_data.metrics)
    seen: set[int] = set()
    queue = deque(step.deps)
    while queue:
        seq = queue.popleft()
        upstream = by_seq.get(seq)
        if seq in seen or upstream is None:
            continue
        seen.add(seq)
        queue.extend(upstream.deps)
        result.inputs.append(
            DataArtifact(
                step_key=upstream.key,
                task=upstream.task,
                seq=upstream.seq,
                status=upstream.status,
                hash=upstream.output_hash,
                type=upstream.output_type,
                size=upstream.output_size,
                serializer=upstream.serializer,
                stored=None
                if not upstream.has_output()
                else ("artifact" if upstream.output_ref else "inline"),
                inputs=tuple(by_seq[d].key for d in upstream.deps if d in by_seq),
                logged=tuple(load_logged_artifacts(store, run.id, upstream.seq)),
            )
        )
    return result
