"""The workflows a server can start, and how it starts them.

Workflows come from code locations given to `keel server --workflows` or listed in
a `keel.toml` (`[server] workflows = ["flows/train.py:train", "flows/etl.py"]`): a
reference with `:name` is one workflow, a file or module alone is every workflow
defined in it. Each is described with its parameters as a JSON Schema (from the
function's signature and type hints, through pydantic) for launch forms.

A run started over HTTP is first recorded as queued (PENDING, with a queue entry),
exactly like `keel.submit`. Then, with dispatch "server" (the default), a thread of
the server claims it and runs it; with dispatch "queue" it waits for `keel worker`
processes. Either way a server that dies mid-run loses nothing: the claim's lease
runs out and any worker, or a server that takes runs over (`keel server
--takeover`, the default with dispatch "server"), continues the run by replay.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import socket
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from keel.errors import DefinitionError, KeelError, ParameterError, qualified_name
from keel.sdk.definitions import Workflow
from keel.status import FINISHED_RUN, RunStatus
from keel.store import queue
from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.server")

Dispatch = Literal["server", "queue"]
DISPATCHES: tuple[Dispatch, ...] = ("server", "queue")
_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class WorkflowEntry:
    workflow: Workflow[Any, Any]
    source: str  # the reference it was registered from

    @property
    def name(self) -> str:
        return self.workflow.name


class WorkflowRegistry:
    """Workflows by name, in the order they were registered."""

    def __init__(self, workflows: Iterable[Workflow[Any, Any]] = ()) -> None:
        self._entries: dict[str, WorkflowEntry] = {}
        for wf in workflows:
            self.add(wf, wf.entrypoint)

    def add(self, workflow: Workflow[Any, Any], source: str) -> None:
        known = self._entries.get(workflow.name)
        if known is not None and known.workflow is not workflow:
            raise DefinitionError(
                f"two workflows are named {workflow.name!r} ({known.source} and {source})",
                hint="Give one of them another name: @keel.workflow(name=...)",
            )
        self._entries[workflow.name] = WorkflowEntry(workflow, source)

    def load(self, ref: str) -> list[Workflow[Any, Any]]:
        """Register the workflow(s) `ref` names; returns them."""
        found = load_refs(ref)
        for wf in found:
            self.add(wf, ref)
        return found

    def get(self, name: str) -> WorkflowEntry | None:
        return self._entries.get(name)

    def __iter__(self) -> Any:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def load_refs(ref: str) -> list[Workflow[Any, Any]]:
    """`file.py:name` / `module:name` (one workflow) or `file.py` / `module` (all of them)."""
    from keel.sdk.loader import load_workflow, module_from_file

    text = ref.strip()
    target, sep, attr = text.rpartition(":")
    if sep and attr and not attr.startswith(("/", "\\")) and target:
        return [load_workflow(text)]
    if text.endswith(".py") or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DefinitionError(f"no such file: {text}", hint="Check the path to the workflows")
        module = module_from_file(path)
    else:
        try:
            module = importlib.import_module(text)
        except ModuleNotFoundError as exc:
            raise DefinitionError(
                f"cannot import module {text!r}: {exc}",
                hint="Give a file path (flows/train.py) or an importable module",
            ) from None
    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    if not found:
        raise DefinitionError(f"no @keel.workflow in {text}", hint="Name a file that defines one")
    # A module may import a workflow under two names; each counts once.
    unique: dict[int, Workflow[Any, Any]] = {id(wf): wf for wf in found}
    return list(unique.values())


def config_refs(folder: Path) -> list[str]:
    """The `[server] workflows` list of `keel.toml` in `folder`, if there is one.
    Relative file paths in it are relative to the file."""
    path = folder / "keel.toml"
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{path} is not valid TOML: {exc}") from None
    refs = data.get("server", {}).get("workflows", [])
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DefinitionError(
            f"{path}: [server] workflows must be a list of strings",
            hint='e.g. workflows = ["flows/train.py:train", "flows/etl.py"]',
        )
    out = []
    for ref in refs:
        target = ref.rpartition(":")[0] if ":" in ref else ref
        if target.endswith(".py") and not Path(target).is_absolute():
            ref = str(path.parent / ref)
        out.append(ref)
    return out


# -- parameters as JSON Schema -----------------------------------------------------------


def params_schema(wf: Workflow[Any, Any]) -> dict[str, Any]:
    """The workflow's parameters as one JSON Schema object (for a launch form)."""
    from pydantic import TypeAdapter

    validator = wf.validator
    properties: dict[str, Any] = {}
    required: list[str] = []
    defs: dict[str, Any] = {}
    for name, param in validator.params.items():
        adapter: TypeAdapter[Any] | None = validator.adapters.get(name)
        schema: dict[str, Any] = {}
        if adapter is not None:
            try:
                schema = adapter.json_schema(ref_template="#/$defs/{model}")
            except Exception:  # a type JSON Schema cannot describe: any value is offered
                schema = {"description": f"a {validator.labels[name]} (no JSON Schema)"}
        defs.update(schema.pop("$defs", {}))
        schema.setdefault("title", name.replace("_", " ").capitalize())
        if param.default is inspect.Parameter.empty:
            required.append(name)
        else:
            default = _json_default(param.default)
            if default is not _NO_DEFAULT:
                schema["default"] = default
        properties[name] = schema
    out: dict[str, Any] = {
        "type": "object",
        "title": wf.name,
        "properties": properties,
        "required": required,
        "additionalProperties": bool(validator.accepts_extra),
    }
    if defs:
        out["$defs"] = defs
    return out


_NO_DEFAULT = object()


def _json_default(value: Any) -> Any:
    from pydantic_core import to_jsonable_python

    try:
        return to_jsonable_python(value)
    except Exception:
        return _NO_DEFAULT


def check_params(wf: Workflow[Any, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """Validate launch parameters. A ParameterError carries every problem found in
    `.problems` (a list of {"parameter", "message"}), for a form to show each."""
    from pydantic import ValidationError

    validator = wf.validator
    problems: list[dict[str, str]] = []
    for name in given:
        if name not in validator.params and not validator.accepts_extra:
            problems.append({"parameter": name, "message": f"{wf.name} has no parameter {name!r}"})
    for name, param in validator.params.items():
        if name not in given:
            if param.default is inspect.Parameter.empty:
                label = validator.labels[name]
                problems.append({"parameter": name, "message": f"{name!r} ({label}) is required"})
            continue
        adapter = validator.adapters.get(name)
        if adapter is None:
            continue
        try:
            adapter.validate_python(given[name])
        except ValidationError as exc:
            reason = exc.errors()[0].get("msg", "invalid")
            problems.append(
                {
                    "parameter": name,
                    "message": f"{name!r} expects {validator.labels[name]}, "
                    f"got {given[name]!r}: {reason}",
                }
            )
    if problems:
        first = problems[0]
        err = ParameterError(
            f"parameter {first['parameter']!r} of workflow {wf.name}: {first['message']}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            hint=f"Its parameters: {validator.describe() or '(none)'}",
        )
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    return wf.validate(given)


# -- running -----------------------------------------------------------------------------


class Runner:
    """Runs queued runs on threads of the server process (dispatch "server")."""

    def __init__(self, store: MetadataStore) -> None:
        from keel.engine.api import LEASE_SECONDS

        self.store = store
        self.lease_seconds = LEASE_SECONDS
        self.id = f"{socket.gethostname()}:{os.getpid()}:server"
        self._keeper: queue.LeaseKeeper | None = None
        self._executing: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def active(self, run_id: str) -> bool:
        """Whether a thread of this server is executing the run now."""
        with self._lock:
            return run_id in self._executing

    def follow(self, run_id: str) -> None:
        """Claim the queued run (whenever it is due) and run it here until it ends."""
        self._start(run_id, self._follow, run_id)

    def start_takeover(self) -> None:
        """Take over, one at a time and exactly once across processes, every run whose
        owner stopped renewing its lease (a killed `keel run`, server or worker)."""
        thread = threading.Thread(target=self._take_over, name="keel-takeover", daemon=True)
        thread.start()

    def _take_over(self) -> None:
        # One indexed query a turn (ix_keel_queue_lease): cheap enough to look every second.
        every = min(max(self.lease_seconds / 3, 0.2), 1.0)
        while not self._stop.is_set():
            try:
                claim = queue.claim_lost_run(self.store, self.id, lease_seconds=self.lease_seconds)
            except Exception as exc:  # a database blip: look again at the next turn
                log.warning("looking for runs to take over failed: %s", exc)
                claim = None
            if claim is None:
                self._stop.wait(every)
                continue
            log.warning("taking over run %s: its owner stopped renewing its lease", claim.run_id)
            self._start(claim.run_id, self._follow, claim.run_id, claim)

    def _start(self, run_id: str, target: Any, *args: Any) -> None:
        with self._lock:
            if self._keeper is None:
                self._keeper = queue.LeaseKeeper(self.store, self.id, self.lease_seconds)
        thread = threading.Thread(
            target=self._guard, args=(run_id, target, *args), name=f"keel-server-{run_id}"
        )
        thread.daemon = True
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _guard(self, run_id: str, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except Exception as exc:  # the run cannot start here (its code cannot be found...)
            log.error("run %s failed to run in the server: %s", run_id, exc)
            try:
                row = self.store.get_run(run_id)
                if row is not None and row.status not in FINISHED_RUN:
                    self.store.update_run(
                        run_id,
                        status=str(RunStatus.FAILED),
                        ended_at=time.time(),
                        error_type=qualified_name(type(exc)),
                        error_message=exc.message if isinstance(exc, KeelError) else str(exc),
                    )
            except Exception as again:  # the store is gone too: the lease runs out instead
                log.error("could not record the failure of run %s: %s", run_id, again)

    def _follow(self, run_id: str, taken: queue.Claim | None = None) -> None:
        from keel.engine.api import continue_run, new_session

        keeper = self._keeper
        assert keeper is not None
        while not self._stop.is_set():
            if taken is not None:
                claim: queue.Claim | None = taken
                taken = None
            else:
                claim = queue.claim_run(
                    self.store, self.id, run_id, lease_seconds=self.lease_seconds
                )
            if claim is None:
                row = self.store.get_run(run_id)
                if row is None or row.status in FINISHED_RUN:
                    return
                if queue.item_id_for(self.store, f"run:{run_id}") is None:
                    return
                self._stop.wait(_POLL_SECONDS)
                continue
            keeper.hold(claim.id)
            with self._lock:
                self._executing.add(run_id)
            row = self.store.get_run(run_id)
            session = new_session(store=self.store, executor=row.executor if row else None)
            try:
                outcome = continue_run(session, run_id)
            except Exception:
                queue.complete(self.store, claim.id, self.id)
                raise
            finally:
                keeper.drop(claim.id)
                session.close()
                with self._lock:
                    self._executing.discard(run_id)
            if outcome.status is not RunStatus.PENDING:
                queue.complete(self.store, claim.id, self.id)
                return

    def retry(self, run_id: str) -> str:
        """Record the retry of `run_id` (errors go to the caller), run it on a thread;
        the new run's id."""
        from keel.engine.api import prepare_retry

        prepared = prepare_retry(run_id, store=self.store)
        self._start(prepared.id, prepared.execute)
        return prepared.id

    def stop(self, wait: float = 0.0) -> None:
        """Stop following queued runs; wait up to `wait` seconds for running ones."""
        self._stop.set()
        end = time.monotonic() + wait
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, end - time.monotonic()))
        if self._keeper is not None:
            self._keeper.stop()


# -- what a request finds on the app ------------------------------------------------------


def registry_of(state: Any) -> WorkflowRegistry:
    """The app's workflow registry (`app.state.workflows`; empty unless configured)."""
    registry = getattr(state, "workflows", None)
    if registry is None:
        registry = state.workflows = WorkflowRegistry()
    return registry  # type: ignore[no-any-return]


def dispatch_of(state: Any) -> Dispatch:
    return "queue" if getattr(state, "dispatch", None) == "queue" else "server"


def runner_of(state: Any) -> Runner:
    runner = getattr(state, "runner", None)
    if runner is None:
        with _runner_lock:
            runner = getattr(state, "runner", None)
            if runner is None:
                runner = state.runner = Runner(state.store)
    return runner  # type: ignore[no-any-return]


_runner_lock = threading.Lock()
