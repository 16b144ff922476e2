"""Start, resume, retry and cancel runs; the handle a caller gets back."""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from typing import Any

from keel.engine import owner
from keel.engine.execute import (
    RunOutcome,
    execute,
    fresh_state,
    new_run_row,
    owner_fields,
    record_new_run,
    running_here,
)
from keel.engine.owner import LEASE_SECONDS as LEASE_SECONDS
from keel.engine.run import RunState
from keel.engine.session import Session
from keel.errors import RunStateError
from keel.ids import new_run_id
from keel.sdk.definitions import Workflow, registered_workflows
from keel.status import FINISHED_RUN, REUSABLE_STEP, RunStatus
from keel.store import closing, queue
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store
from keel.store.recorder import recorder_for
from keel.store.retry import with_retry


class RunHandle:
    """A run started from Python: its id, its current status, its result."""

    def __init__(self, run_id: str, store: MetadataStore) -> None:
        self.id = run_id
        self._store = store

    def __repr__(self) -> str:
        return f"<keel run {self.id} {self.status}>"

    @property
    def status(self) -> str:
        row = self._store.get_run(self.id)
        return row.status if row is not None else "UNKNOWN"

    @property
    def workflow(self) -> str:
        row = self._store.get_run(self.id)
        return row.workflow if row is not None else ""

    def result(self) -> Any:
        """The workflow's return value; raises RunFailedError if the run did not succeed."""
        from keel.client import Client

        return Client(store=self._store).run(self.id).result()


def new_session(
    *,
    store: MetadataStore | None = None,
    executor: str | None = None,
    max_concurrency: int | None = None,
) -> Session:
    store = store or open_store()
    return Session(
        store=store,
        recorder=recorder_for(store),
        executor_name=executor,
        max_concurrency=max_concurrency,
    )


def start_run(
    workflow: Workflow[Any, Any],
    params: dict[str, Any],
    *,
    session: Session | None = None,
    validated: bool = False,
) -> RunHandle:
    """Run a workflow to its end on this thread. `params` are validated unless `validated`."""
    clean = params if validated else workflow.validate(params)
    session = session or new_session(executor=workflow.executor)
    run_id = new_run_id()
    store = session.store
    row = new_run_row(
        store,
        run_id,
        workflow,
        workflow.validator.to_json(clean),
        executor=session.executor_name or workflow.executor,
    )
    # This process owns the run while it drives it: if it dies, the lease runs out
    # and a server or worker takes the run over (engine/owner.py).
    entry_id = record_new_run(session, row, clean, owner.new_entry(run_id))
    assert entry_id is not None
    state = fresh_state(session, run_id, workflow, {})
    try:
        with owner.holding(store, run_id, entry_id):
            outcome = execute(state, clean)
        if outcome.status is RunStatus.PENDING:
            _follow(session, run_id, workflow)
    finally:
        session.close()
    return RunHandle(run_id, store)


_POLL_SECONDS = 0.2


def continue_run(
    session: Session,
    run_id: str,
    *,
    workflow: Workflow[Any, Any] | None = None,
    resuming: bool = False,
) -> RunOutcome:
    """Replay a recorded run here until it ends or parks again. The caller must hold
    the run (its queue claim, or the knowledge that no one else runs it).

    `resuming`: a user asked to continue it (`keel resume`), so a cancelled run runs
    again; a run taken from the queue that was cancelled meanwhile does not.
    """
    store = session.store
    row = store.get_run(run_id)
    assert row is not None
    if not resuming and row.status in FINISHED_RUN and row.status != RunStatus.FAILED:
        # Cancelled (or finished) while it waited in the queue: nothing to do.
        return RunOutcome(run_id, RunStatus(row.status))
    wf = workflow or locate_workflow(row.workflow, row.entrypoint)
    params = wf.validate(json.loads(row.params or "{}"))
    recorded = {step.seq: step for step in store.load_steps(run_id)}
    store.update_run(
        run_id,
        started_at=row.started_at or time.time(),
        status=str(RunStatus.RUNNING),
        cancel_requested=False,
        ended_at=None,
        wake_at=None,
        error_type=None,
        error_message=None,
        traceback=None,
        **owner_fields(),
    )
    return execute(fresh_state(session, run_id, wf, recorded), params)


def _follow(session: Session, run_id: str, workflow: Workflow[Any, Any] | None) -> None:
    """Block until a parked run ends: continue it here whenever it wakes (a timer
    expired, a signal arrived), unless a worker took it first, then wait for that."""
    store = session.store
    me = owner.foreground_id()
    keeper = queue.LeaseKeeper(store, me, LEASE_SECONDS)
    try:
        while True:
            claim = with_retry(
                lambda: queue.claim_run(store, me, run_id, lease_seconds=LEASE_SECONDS),
                what=f"claiming run {run_id}",
            )
            if claim is None:
                row = with_retry(lambda: store.get_run(run_id), what=f"reading run {run_id}")
                if row is None or row.status in FINISHED_RUN:
                    return
                time.sleep(_POLL_SECONDS)
                continue
            keeper.hold(claim.id)
            try:
                outcome = continue_run(session, run_id, workflow=workflow)
            finally:
                keeper.drop(claim.id)
            if outcome.status is not RunStatus.PENDING:
                with_retry(
                    functools.partial(queue.complete, store, claim.id, me),
                    what=f"completing run {run_id}",
                )
                return
    finally:
        keeper.stop()


def submit(
    workflow: Workflow[Any, Any],
    /,
    *,
    queue_name: str | None = None,
    priority: int | None = None,
    **params: Any,
) -> RunHandle:
    """Queue a run for `keel worker` processes instead of running it here (on the
    workflow's queue and priority unless given)."""
    clean = workflow.validate(params)
    queue_name = queue_name or workflow.queue
    priority = workflow.priority if priority is None else priority
    store = open_store()
    session = new_session(store=store, executor=workflow.executor)
    run_id = new_run_id()
    row = new_run_row(
        store, run_id, workflow, workflow.validator.to_json(clean), executor=workflow.executor
    )
    row.update(status=str(RunStatus.PENDING), started_at=None, queue=queue_name, priority=priority)
    record_new_run(session, row, clean)
    session.recorder.flush()
    queue.enqueue_run(store, run_id, queue=queue_name, priority=priority)
    return RunHandle(run_id, store)


def signal(
    run_id: str, name: str, payload: Any = None, *, store: MetadataStore | None = None
) -> None:
    """Send the signal `name` with a JSON payload to a run; it is kept until a
    `keel.wait_for_signal(name)` of the run reads it."""
    from keel.store import signals

    store = store or open_store()
    rid = store.resolve_run_id(run_id)
    row = store.get_run(rid)
    assert row is not None
    if row.status in FINISHED_RUN:
        raise RunStateError(
            f"run {rid} is {row.status}: it will never read signal {name!r}",
            run_id=rid,
            hint="Signal a run that is still running or waiting",
        )
    if not isinstance(name, str) or not name or len(name) > 200:
        raise RunStateError(f"a signal name must be a non-empty string, got {name!r}", run_id=rid)
    from keel.store.limits import check_text

    check_text("a signal name", name, field="name")
    try:
        json.dumps(payload)
    except (TypeError, ValueError) as exc:
        raise RunStateError(
            f"the payload of signal {name!r} must be JSON data: {exc}", run_id=rid
        ) from None
    signals.send(store, rid, name, payload)
    # A run parked on its signals (possibly a child run: wake its root) is due now.
    queue.wake_run(store, rid.split(".")[0])


def run(workflow: Workflow[Any, Any], /, **params: Any) -> RunHandle:
    """Run `workflow` durably with `params` and wait for it to end.

    Returns a handle whether the run succeeded or failed; `handle.result()` raises
    for a failed run. Ctrl-C cancels the run (recorded, resumable) and re-raises.
    """
    return start_run(workflow, params)


def locate_workflow(name: str, entrypoint: str | None) -> Workflow[Any, Any]:
    """The workflow a recorded run used: from this process if defined here, else imported."""
    known = registered_workflows().get(name)
    if known is not None and (entrypoint is None or known.entrypoint == entrypoint):
        return known
    if not entrypoint:
        raise RunStateError(
            f"the run records no code location for workflow {name!r}",
            hint="Import the module that defines it before resuming",
        )
    from keel.sdk.loader import load_workflow

    if entrypoint.startswith("__main__:") and known is not None:
        return known
    return load_workflow(entrypoint)


def _owner_alive(row: Any, store: MetadataStore | None = None) -> bool:
    """Whether a process may still drive the run: its owner holds a live lease on the
    run's entry (any host); else, for runs with no claimed entry, its recorded process."""
    if row.pid == os.getpid() and row.host == socket.gethostname() and row.id in running_here:
        return True
    if store is not None and not row.parent_id:
        lease = queue.run_lease(store, row.id)
        if lease is not None and lease.status == queue.CLAIMED:
            return owner.dead_owner(lease) is None
    if row.pid is None:
        return False
    if row.pid == os.getpid() and row.host == socket.gethostname():
        return row.id in running_here
    if row.host != socket.gethostname():
        return True  # cannot see processes on another host; assume it is alive
    try:
        os.kill(row.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _top_level_run(store: MetadataStore, run_id: str, verb: str) -> Any:
    """The run with that id (or id prefix); child runs are continued through their root."""
    rid = store.resolve_run_id(run_id)
    row = store.get_run(rid)
    assert row is not None
    if row.parent_id:
        root = row.parent_id.split(".")[0]
        raise RunStateError(
            f"run {rid} is a child of run {row.parent_id}",
            run_id=rid,
            hint=f"{verb.capitalize()} its root run: keel {verb} {root}",
        )
    return row


def resume(
    run_id: str,
    *,
    force: bool = False,
    session: Session | None = None,
    store: MetadataStore | None = None,
) -> RunHandle:
    """Continue a run that crashed, failed or was cancelled, by replaying its workflow.

    Recorded steps return their recorded outputs without running; the others run.
    A succeeded run is left as it is. `force` resumes a run that looks alive elsewhere.
    """
    store = store or (session.store if session else open_store())
    row = _top_level_run(store, run_id, "resume")
    rid = row.id
    if row.status == RunStatus.SUCCEEDED:
        return RunHandle(rid, store)
    if row.status == RunStatus.RUNNING and not force and _owner_alive(row, store):
        raise RunStateError(
            f"run {rid} is still running in process {row.pid} on {row.host}",
            run_id=rid,
            hint="Cancel it first (keel cancel), or pass --force if that process is gone",
        )
    session = session or new_session(store=store, executor=row.executor)
    try:
        if row.status == RunStatus.PENDING and queue.item_id_for(store, f"run:{rid}") is not None:
            # Parked or queued: whoever claims it continues it; follow it from here.
            _follow(session, rid, None)
            return RunHandle(rid, store)
        claim = owner.take(store, row, force=force)
        if claim is None:
            # A server or worker took the run over meanwhile: follow it from here.
            _follow(session, rid, None)
            return RunHandle(rid, store)
        with owner.holding(store, rid, claim.id):
            outcome = continue_run(session, rid, resuming=True)
        if outcome.status is RunStatus.PENDING:
            _follow(session, rid, None)
    finally:
        session.close()
    return RunHandle(rid, store)


class PreparedRetry:
    """A retry recorded in the store and not started yet: its run id is known before
    it runs (the server answers with it, then runs it on a thread)."""

    def __init__(
        self,
        state: RunState,
        params: dict[str, Any],
        session: Session,
        workflow: Workflow[Any, Any],
        entry_id: int,
    ) -> None:
        self.id: str = state.run_id
        self._entry_id = entry_id
        self._state = state
        self._params = params
        self._session = session
        self._workflow = workflow

    def execute(self) -> RunHandle:
        """Run the retry to its end on this thread; a wait that parks it (a long sleep,
        a signal) is waited out here, as `keel.run` does."""
        try:
            with owner.holding(self._session.store, self.id, self._entry_id):
                outcome = execute(self._state, self._params)
            if outcome.status is RunStatus.PENDING:
                _follow(self._session, self.id, self._workflow)
        finally:
            self._session.close()
        return RunHandle(self.id, self._session.store)


def prepare_retry(
    run_id: str,
    *,
    workflow: Workflow[Any, Any] | None = None,
    session: Session | None = None,
    store: MetadataStore | None = None,
) -> PreparedRetry:
    """Record the new run of a retry of `run_id` (see `retry`) without running it."""
    store = store or (session.store if session else open_store())
    row = _top_level_run(store, run_id, "retry")
    rid = row.id
    if row.status not in FINISHED_RUN and _owner_alive(row, store):
        raise RunStateError(
            f"run {rid} is still running", run_id=rid, hint="Wait for it or cancel it first"
        )
    wf = workflow or locate_workflow(row.workflow, row.entrypoint)
    params = wf.validate(json.loads(row.params or "{}"))
    recorded = {s.seq: s for s in store.load_steps(rid) if s.status in REUSABLE_STEP}
    session = session or new_session(store=store, executor=row.executor)
    new_id = new_run_id()
    new_row = new_run_row(
        store, new_id, wf, wf.validator.to_json(params), executor=row.executor, retry_of=rid
    )
    entry_id = record_new_run(session, new_row, params, owner.new_entry(new_id))
    assert entry_id is not None
    state = fresh_state(session, new_id, wf, recorded, strict_replay=False, reused_from=rid)
    return PreparedRetry(state, params, session, wf, entry_id)


def retry(
    run_id: str,
    *,
    workflow: Workflow[Any, Any] | None = None,
    session: Session | None = None,
    store: MetadataStore | None = None,
) -> RunHandle:
    """Start a new run of a finished run's workflow that reuses its succeeded steps.

    The workflow's current code is used, so a fix can be tried: steps are reused in
    order until the code calls something different, and run fresh from there.
    """
    return prepare_retry(run_id, workflow=workflow, session=session, store=store).execute()


def cancel(run_id: str, *, store: MetadataStore | None = None) -> str:
    """Ask a run to stop. Returns the status it has now (CANCELLED when it was not alive)."""
    store = store or open_store()
    rid = store.resolve_run_id(run_id)
    row = store.get_run(rid)
    assert row is not None
    if row.status in FINISHED_RUN:
        return str(row.status)
    store.request_cancel(rid)
    if row.status == RunStatus.PENDING or not _owner_alive(row, store):
        # Waiting in the queue (submitted, parked) or its process is gone: no one
        # else will end it, so end it here with its open steps, child runs and
        # queued work. (A live owner does the same when it stops.)
        closing.close_run(store, rid, "the run was cancelled")
        return str(RunStatus.CANCELLED)
    return str(row.status)


def open_default_store(db_url: str | None = None) -> MetadataStore:
    return open_store(StoreConfig.from_env(db_url=db_url))
