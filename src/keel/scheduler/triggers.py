"""Triggers: start a workflow when something happens.

- `on_run`: a run of another workflow ends (SUCCEEDED by default, or FAILED...);
  the run gets `upstream_run_id` and `upstream_status` if it declares them.
- `on_alias`: a registry alias is set or moved to another version (`model` or
  `model@alias`); the run gets `model_name`, `model_alias`, `model_version`.
- `webhook`: `keel.fire_trigger(name, payload)` (what `POST /api/v1/triggers/NAME`
  calls): the payload's keys are the run's parameters, checked against the workflow.
- `on_files`: files appearing under an fsspec glob (sensors.py); the run gets `path`.

The scheduler evaluates triggers; each firing is one row in keel_trigger_events
(its cause and the run it started), written in the transaction that creates the
run and moves the trigger's state past the cause, under the trigger's row lock:
each cause starts one run, even with several schedulers.
"""

from __future__ import annotations

import difflib
import hmac
import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from keel.errors import ParameterError, ScheduleError
from keel.scheduler.launch import Launch, insert_runs, lock_row, prepare
from keel.scheduler.schedules import resolve_workflow
from keel.sdk.definitions import Workflow
from keel.sdk.schedule import check_name
from keel.status import FINISHED_RUN
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import registry_events, runs, trigger_events
from keel.store.schema import triggers as trigger_rows

if TYPE_CHECKING:
    from keel.engine.api import RunHandle

KINDS = ("run", "alias", "webhook", "files")
# Causes are looked for this far back before the last one seen, so that a run or an
# alias move committed late (its timestamp is older than its commit) is still found.
LOOKBACK = 600.0
DEFAULT_POLL_SECONDS = 30.0
# What each kind offers a workflow that declares a parameter of that name.
OFFERED = {
    "run": ("upstream_run_id", "upstream_status"),
    "alias": ("model_name", "model_alias", "model_version"),
    "files": ("path",),
}


@dataclass(frozen=True)
class TriggerInfo:
    name: str
    kind: str
    config: dict[str, Any]
    workflow: str
    entrypoint: str | None
    params: dict[str, Any]
    enabled: bool
    created_at: float

    def describe(self) -> str:
        c = self.config
        if self.kind == "run":
            return f"when a run of {c['workflow']} ends {'/'.join(c['statuses'])}"
        if self.kind == "alias":
            target = f"{c['model']}@{c['alias']}" if c.get("alias") else f"an alias of {c['model']}"
            return f"when {target} moves"
        if self.kind == "files":
            every = f"{c['poll_seconds']:g}s"
            return f"for each new file matching {c['pattern']} (listed every {every})"
        return f"webhook: POST /api/v1/triggers/{self.name}"


@dataclass(frozen=True)
class TriggerEvent:
    id: int
    trigger: str
    fired_at: float
    cause: dict[str, Any]
    run_id: str | None


@dataclass
class Cause:
    """Something that happened once and fires the trigger once."""

    key: str
    at: float
    detail: dict[str, Any]
    offered: dict[str, Any]


def _info(row: Any) -> TriggerInfo:
    return TriggerInfo(
        name=row.name,
        kind=row.kind,
        config=json.loads(row.config or "{}"),
        workflow=row.workflow,
        entrypoint=row.entrypoint,
        params=json.loads(row.params or "{}"),
        enabled=bool(row.enabled),
        created_at=row.created_at,
    )


# -- definitions -----------------------------------------------------------------------
def add(
    name: str,
    workflow: Workflow[Any, Any] | str,
    *,
    on_run: str | None = None,
    statuses: Sequence[str] = ("SUCCEEDED",),
    on_alias: str | None = None,
    webhook: bool = False,
    on_files: str | None = None,
    poll_seconds: float = DEFAULT_POLL_SECONDS,
    ignore_existing: bool = False,
    params: Mapping[str, Any] | None = None,
    replace: bool = False,
    store: MetadataStore | None = None,
) -> TriggerInfo:
    """Create the trigger `name` starting `workflow` (with `params`) on exactly one of:
    `on_run` (a workflow name; `statuses` among SUCCEEDED, FAILED, CANCELLED),
    `on_alias` ('model' or 'model@alias'), `webhook=True`, `on_files` (an fsspec glob
    such as 's3://bucket/in/*.csv', listed every `poll_seconds`; `ignore_existing`
    skips the files already there when the trigger is created)."""
    check_name(name, "trigger")
    chosen = [k for k, v in (("run", on_run), ("alias", on_alias), ("files", on_files)) if v]
    if webhook:
        chosen.append("webhook")
    if len(chosen) != 1:
        raise ScheduleError(
            f"trigger {name}: give exactly one of on_run, on_alias, webhook, on_files"
            + (f" (got {', '.join(chosen)})" if chosen else ""),
        )
    kind = chosen[0]
    wf = resolve_workflow(workflow)
    config: dict[str, Any]
    state: dict[str, Any] = {"since": time.time(), "seen": {}}
    if kind == "run":
        assert on_run is not None
        wanted = [str(s).upper() for s in statuses]
        if not wanted or set(wanted) - set(FINISHED_RUN):
            raise ScheduleError(
                f"trigger {name}: bad statuses {list(statuses)!r}",
                hint="Use SUCCEEDED, FAILED and/or CANCELLED",
            )
        upstream = _workflow_name(on_run)
        if upstream == wf.name:
            raise ScheduleError(
                f"trigger {name} would start {wf.name} whenever {wf.name} ends: an endless loop",
                hint="Trigger a different workflow",
            )
        config = {"workflow": upstream, "statuses": sorted(set(wanted))}
    elif kind == "alias":
        assert on_alias is not None
        model, _, alias = on_alias.partition("@")
        if not model.strip():
            raise ScheduleError(f"trigger {name}: {on_alias!r} names no model", hint="model@alias")
        config = {"model": model.strip(), "alias": alias.strip() or None}
    elif kind == "files":
        assert on_files is not None
        if poll_seconds < 0:
            raise ScheduleError(f"trigger {name}: poll_seconds must be >= 0")
        from keel.scheduler.sensors import check_pattern, list_files

        pattern = check_pattern(on_files)
        config = {"pattern": pattern, "poll_seconds": float(poll_seconds)}
        # With ignore_existing, the files there now count as fired for already.
        state = {"seen": list_files(pattern) if ignore_existing else []}
    else:
        config = {"token": secrets.token_urlsafe(24)}
    static = _check_static(wf, kind, dict(params or {}))
    store = store or open_store()
    row = {
        "kind": kind,
        "config": json.dumps(config, sort_keys=True),
        "workflow": wf.name,
        "entrypoint": wf.entrypoint,
        "params": json.dumps(static, sort_keys=True),
        "enabled": True,
        "state": json.dumps(state),
        "created_at": time.time(),
    }
    with store.engine.begin() as conn:
        exists = lock_row(conn, trigger_rows, name, "state")
        if exists and not replace:
            raise ScheduleError(
                f"trigger {name!r} exists already",
                hint="Pick another name, or remove it first (keel triggers rm)",
            )
        if exists:
            conn.execute(trigger_rows.update().where(trigger_rows.c.name == name).values(**row))
        else:
            conn.execute(trigger_rows.insert().values(name=name, **row))
    return get(name, store=store)


def _workflow_name(ref: str) -> str:
    """An upstream workflow: its name, or a reference to load it from."""
    return resolve_workflow(ref).name if ":" in ref else ref


def _check_static(wf: Workflow[Any, Any], kind: str, static: dict[str, Any]) -> dict[str, Any]:
    """A trigger's own params, checked against the workflow with sample cause values
    (a webhook's payload may bring the parameters still missing)."""
    validator = wf.validator
    unknown = [k for k in static if k not in validator.params]
    if unknown and not validator.accepts_extra:
        raise ParameterError(
            f"workflow {wf.name} has no parameter {', '.join(map(repr, unknown))}",
            hint=f"Its parameters are: {validator.describe() or '(none)'}",
        )
    if kind == "webhook":
        from pydantic import ValidationError

        for key, value in static.items():
            adapter = validator.adapters.get(key)
            try:
                if adapter is not None:
                    adapter.validate_python(value)
            except ValidationError:
                raise ParameterError(
                    f"parameter {key!r} of workflow {wf.name} expects "
                    f"{validator.labels[key]}, got {value!r}"
                ) from None
        return json.loads(validator.to_json(static))  # type: ignore[no-any-return]
    samples: dict[str, Any] = {"upstream_run_id": "r", "upstream_status": "SUCCEEDED"}
    samples |= {"model_name": "m", "model_alias": "a", "model_version": 1, "path": "/p"}
    offered = {k: samples[k] for k in OFFERED[kind] if k in validator.params}
    wf.validate({**static, **offered})
    return json.loads(validator.to_json(static))  # type: ignore[no-any-return]


def get(name: str, *, store: MetadataStore | None = None) -> TriggerInfo:
    store = store or open_store()
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(trigger_rows).where(trigger_rows.c.name == name)).first()
    if row is None:
        raise unknown(store, name)
    return _info(row)


def unknown(store: MetadataStore, name: str) -> ScheduleError:
    with store.engine.connect() as conn:
        names = list(conn.execute(sa.select(trigger_rows.c.name)).scalars())
    close = difflib.get_close_matches(name, names, n=3)
    hint = (
        f"Did you mean {', '.join(close)}?"
        if close
        else ("See `keel triggers ls`" if names else "Create one with `keel triggers add`")
    )
    return ScheduleError(f"no trigger named {name!r}", hint=hint)


def ls(*, store: MetadataStore | None = None) -> list[TriggerInfo]:
    store = store or open_store()
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(trigger_rows).order_by(trigger_rows.c.name)).all()
    return [_info(r) for r in rows]


def remove(name: str, *, store: MetadataStore | None = None) -> None:
    """Delete the trigger (its recorded events stay)."""
    store = store or open_store()
    with store.engine.begin() as conn:
        done = conn.execute(trigger_rows.delete().where(trigger_rows.c.name == name)).rowcount
    if not done:
        raise unknown(store, name)


def events(
    name: str | None = None, *, limit: int = 50, store: MetadataStore | None = None
) -> list[TriggerEvent]:
    """Recorded firings, newest first (of one trigger, or of all)."""
    store = store or open_store()
    stmt = sa.select(trigger_events).order_by(trigger_events.c.id.desc()).limit(limit)
    if name is not None:
        stmt = stmt.where(trigger_events.c.trigger == name)
    with store.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return [
        TriggerEvent(r.id, r.trigger, r.fired_at, json.loads(r.cause or "{}"), r.run_id)
        for r in rows
    ]


# -- firing --------------------------------------------------------------------------------
def fire_trigger(
    name: str,
    payload: Mapping[str, Any] | None = None,
    *,
    token: str | None = None,
    store: MetadataStore | None = None,
) -> RunHandle:
    """Fire trigger `name` now (a webhook's call): queue a run of its workflow with the
    trigger's params and the payload's keys as parameters. A `token` given (the REST
    server always passes the caller's) must be the webhook's."""
    from keel.engine.api import RunHandle, locate_workflow

    store = store or open_store()
    info = get(name, store=store)
    if token is not None and not hmac.compare_digest(
        str(token).encode(), str(info.config.get("token", "")).encode()
    ):
        raise ScheduleError(f"wrong token for trigger {name!r}", hint="Use the webhook's token")
    if not info.enabled:
        raise ScheduleError(f"trigger {name!r} is disabled")
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise ParameterError(
            f"the payload of trigger {name!r} must be a JSON object of parameters, "
            f"got {type(payload).__name__}"
        )
    wf = locate_workflow(info.workflow, info.entrypoint)
    params = wf.validate({**info.params, **payload})  # the payload is the caller's: strict
    prepare(store, wf)
    kind = "webhook" if info.kind == "webhook" else "manual"
    launch = _launch(info, wf, params)
    with store.engine.begin() as conn:
        insert_runs(conn, store, [launch])
        _record(conn, name, {"kind": kind, "payload": dict(payload)}, launch.run_id)
    return RunHandle(launch.run_id, store)


def _launch(info: TriggerInfo, wf: Workflow[Any, Any], params: dict[str, Any]) -> Launch:
    return Launch(
        workflow=wf,
        params=params,
        queue=wf.queue,
        priority=wf.priority,
        trigger_name=info.name,
        tags={"keel.trigger": info.name},
    )


def _record(conn: sa.Connection, trigger: str, cause: dict[str, Any], run_id: str | None) -> None:
    conn.execute(
        trigger_events.insert().values(
            trigger=trigger,
            fired_at=time.time(),
            cause=json.dumps(cause, sort_keys=True, default=str),
            run_id=run_id,
        )
    )


def fire_causes(
    store: MetadataStore,
    name: str,
    find: Callable[[sa.Connection, TriggerInfo, dict[str, Any]], tuple[list[Cause], Any]],
    load: Callable[[str, str | None], Workflow[Any, Any]],
) -> list[str]:
    """Evaluate one trigger: under its row lock, find the causes not seen before
    (`find` returns them and the trigger's next state), start a run for each, record
    each firing, and store the new state, all in one transaction."""
    with store.engine.connect() as conn:
        pre = conn.execute(sa.select(trigger_rows).where(trigger_rows.c.name == name)).first()
        if pre is None or not pre.enabled:
            return []
        # A look without the lock first: most passes find nothing and write nothing.
        if not find(conn, _info(pre), json.loads(pre.state or "{}"))[0]:
            return []
    wf = load(pre.workflow, pre.entrypoint)
    prepare(store, wf)
    started: list[str] = []
    with store.engine.begin() as conn:
        if not lock_row(conn, trigger_rows, name, "state"):
            return []
        row = conn.execute(sa.select(trigger_rows).where(trigger_rows.c.name == name)).first()
        assert row is not None
        info = _info(row)
        causes, state = find(conn, info, json.loads(row.state or "{}"))
        launches = []
        for cause in causes:
            offered = {k: v for k, v in cause.offered.items() if k in wf.validator.params}
            try:
                params = wf.validate({**info.params, **offered})
            except ParameterError as exc:  # recorded, not retried: the cause is consumed
                _record(conn, name, {**cause.detail, "error": exc.message}, None)
                continue
            launch = _launch(info, wf, params)
            launches.append(launch)
            _record(conn, name, cause.detail, launch.run_id)
            started.append(launch.run_id)
        insert_runs(conn, store, launches)
        conn.execute(
            trigger_rows.update()
            .where(trigger_rows.c.name == name)
            .values(state=json.dumps(state, sort_keys=True))
        )
    return started


def _window(
    info: TriggerInfo, state: dict[str, Any], found: list[tuple[str, float]]
) -> tuple[set[str], dict[str, Any]]:
    """Which of `found` (key, time) are new, and the state that remembers them."""
    seen: dict[str, float] = state.get("seen", {})
    fresh = {key for key, _ in found if key not in seen}
    newest = max([state.get("since", info.created_at), *(at for _, at in found)])
    merged = {**seen, **dict(found)}
    keep = {key: at for key, at in merged.items() if at > newest - LOOKBACK}
    return fresh, {"since": newest, "seen": keep}


def _floor(info: TriggerInfo, state: dict[str, Any]) -> float:
    return max(info.created_at, float(state.get("since", info.created_at)) - LOOKBACK)


def find_run_causes(
    conn: sa.Connection, info: TriggerInfo, state: dict[str, Any]
) -> tuple[list[Cause], dict[str, Any]]:
    """Runs of the upstream workflow that ended (with a wanted status) since last time."""
    rows = conn.execute(
        sa.select(runs.c.id, runs.c.status, runs.c.ended_at)
        .where(
            runs.c.workflow == info.config["workflow"],
            runs.c.parent_id.is_(None),
            runs.c.status.in_(info.config["statuses"]),
            runs.c.ended_at.is_not(None),
            runs.c.ended_at > _floor(info, state),
        )
        .order_by(runs.c.ended_at, runs.c.id)
    ).all()
    fresh, new_state = _window(info, state, [(r.id, float(r.ended_at)) for r in rows])
    causes = [
        Cause(
            key=r.id,
            at=float(r.ended_at),
            detail={
                "kind": "run",
                "run_id": r.id,
                "workflow": info.config["workflow"],
                "status": r.status,
            },
            offered={"upstream_run_id": r.id, "upstream_status": r.status},
        )
        for r in rows
        if r.id in fresh
    ]
    return causes, new_state


def find_alias_causes(
    conn: sa.Connection, info: TriggerInfo, state: dict[str, Any]
) -> tuple[list[Cause], dict[str, Any]]:
    """Alias moves in the registry's audit log since last time (a set to the version
    the alias already had is not a move)."""
    stmt = sa.select(registry_events).where(
        registry_events.c.name == info.config["model"],
        registry_events.c.action == "set_alias",
        registry_events.c.at > _floor(info, state),
    )
    if info.config.get("alias"):
        stmt = stmt.where(registry_events.c.alias == info.config["alias"])
    rows = conn.execute(stmt.order_by(registry_events.c.id)).all()
    fresh, new_state = _window(info, state, [(str(r.id), float(r.at)) for r in rows])
    causes = [
        Cause(
            key=str(r.id),
            at=float(r.at),
            detail={
                "kind": "alias",
                "event_id": r.id,
                "model": r.name,
                "alias": r.alias,
                "version": r.version,
                "previous_version": r.previous_version,
            },
            offered={"model_name": r.name, "model_alias": r.alias, "model_version": r.version},
        )
        for r in rows
        if str(r.id) in fresh and r.version != r.previous_version
    ]
    return causes, new_state


FINDERS = {"run": find_run_causes, "alias": find_alias_causes}

# `keel.triggers.add(...)`: this module is the namespace.
triggers = sys.modules[__name__]
