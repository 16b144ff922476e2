"""Run a workflow body to its end and record the run's outcome.

Shared by root runs (started, resumed or retried from the API) and child runs
(started by a parent's body on their own thread).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keel.engine.interrupts import sigterm_as_interrupt
from keel.engine.run import RunState, _find_futures
from keel.engine.session import Session
from keel.errors import (
    Cancelled,
    SerializationError,
    StepFailedError,
    Suspended,
    Terminated,
    UpstreamFailedError,
    describe_error,
    qualified_name,
)
from keel.sdk.context import set_runtime
from keel.sdk.definitions import Workflow
from keel.sdk.futures import StepFuture
from keel.status import RunStatus
from keel.store import closing, queue
from keel.store.batch_parts import Refusal
from keel.store.limits import clean_text
from keel.store.metadata import MetadataStore
from keel.store.tracking import MAX_KEY_LENGTH, MAX_PARAM_LENGTH, MAX_TAG_LENGTH, experiment_id
from keel.store.values import StoredValue, store_value
from keel.tracking.log import remember_params

# How long a cancelled run waits for steps already running before it is recorded.
CANCEL_GRACE_SECONDS = 5.0


@dataclass(slots=True)
class RunOutcome:
    run_id: str
    status: RunStatus
    stored: StoredValue | None = None
    error: BaseException | None = None
    wake_at: float | None = None  # for a PENDING (parked) run: when it continues


def _resolve_result(value: Any) -> Any:
    futures: list[StepFuture[Any]] = []
    _find_futures(value, futures)
    if not futures:
        return value
    if isinstance(value, StepFuture):
        return value.result()
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve_result(v) for v in value)
    if isinstance(value, dict):
        return {k: _resolve_result(v) for k, v in value.items()}
    return value


def owner_fields() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def new_run_row(
    store: MetadataStore,
    run_id: str,
    workflow: Workflow[Any, Any],
    params_json: str,
    *,
    executor: str | None,
    parent_id: str | None = None,
    parent_seq: int | None = None,
    retry_of: str | None = None,
) -> dict[str, Any]:
    now = time.time()
    return {
        "id": run_id,
        "workflow": workflow.name,
        "entrypoint": workflow.entrypoint,
        "status": str(RunStatus.RUNNING),
        "params": params_json,
        "tags": json.dumps(workflow.tags) if workflow.tags else None,
        "parent_id": parent_id,
        "parent_seq": parent_seq,
        "retry_of": retry_of,
        "executor": executor,
        "created_at": now,
        "started_at": now,
        "cancel_requested": False,
        "kind": "workflow",
        "run_name": workflow.name,
        # Every workflow run is a tracked run, by default in an experiment named
        # after the workflow.
        "experiment_id": experiment_id(store, workflow.experiment or workflow.name),
        "user": _user(),
        **owner_fields(),
    }


def record_new_run(
    session: Session,
    row: dict[str, Any],
    params: Mapping[str, Any],
    entry: dict[str, Any] | None = None,
) -> int | None:
    """Insert the run (at once, so a bad database fails here), with its queue `entry`
    if given (returns its id), and track its parameters and the workflow's tags as
    the run's params and tags."""
    entry_id = session.store.insert_run(row, entry)
    run_id = row["id"]
    texts = {}
    for key, value in params.items():
        # A copy for tracking (the run's params keep the value itself): a parameter
        # holding a NUL character is fine for the workflow, so it is escaped here.
        text = clean_text(str(value))
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 3] + "..."
        texts[key] = text
        session.recorder.param((run_id, -1, clean_text(key)[:MAX_KEY_LENGTH], text))
    # So keel.log_param in the body cannot silently change a parameter of the run.
    remember_params(run_id, -1, texts)
    for key, value in json.loads(row["tags"] or "{}").items():
        tag = clean_text(str(value))[:MAX_TAG_LENGTH]
        session.recorder.tag((run_id, -1, clean_text(key)[:MAX_KEY_LENGTH], tag))
    return entry_id


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


# Runs whose body executes in this process now (so another thread of the same
# process cannot resume one of them a second time).
running_here: set[str] = set()


def execute(state: RunState, params: dict[str, Any]) -> RunOutcome:
    """Run the body on this thread; wait for its steps; record how the run ended.

    On the main thread, SIGTERM stops the run as Ctrl-C does (engine/interrupts.py),
    then ends the process as SIGTERM would have."""
    running_here.add(state.run_id)
    try:
        with sigterm_as_interrupt(then_die=True):
            return _execute(state, params)
    finally:
        running_here.discard(state.run_id)


def _execute(state: RunState, params: dict[str, Any]) -> RunOutcome:
    session = state.session
    workflow = state.workflow
    status = RunStatus.SUCCEEDED
    error: BaseException | None = None
    interrupted: BaseException | None = None
    value: Any = None
    suspended: Suspended | None = None
    previous = set_runtime(state)
    try:
        value = _resolve_result(workflow.fn(**params))
    except Suspended as exc:
        status, suspended = RunStatus.PENDING, exc
    except Cancelled as exc:
        status, error = RunStatus.CANCELLED, exc
    except KeyboardInterrupt as exc:
        session.cancel()
        status, error, interrupted = RunStatus.CANCELLED, Cancelled(state.run_id), exc
    except Exception as exc:
        status, error = RunStatus.FAILED, exc
    finally:
        set_runtime(previous)
    if session.cancelled and status is RunStatus.SUCCEEDED:
        status, error = RunStatus.CANCELLED, Cancelled(state.run_id)
    if session.handing_back and status is RunStatus.CANCELLED:
        # Not a cancellation: a stopping worker hands the run to another worker.
        status, error = RunStatus.PENDING, None
        suspended = Suspended(state.run_id, time.time(), "handed back by a stopping worker")
    try:
        state.wait_idle(CANCEL_GRACE_SECONDS if status is RunStatus.CANCELLED else None)
    except KeyboardInterrupt as exc:  # a second Ctrl-C: stop waiting for running steps
        session.cancel()
        status, error, interrupted = RunStatus.CANCELLED, Cancelled(state.run_id), exc
    if status is RunStatus.SUCCEEDED:
        failed = state.unobserved_failure()
        if failed is not None:
            status, error = RunStatus.FAILED, failed.peek_error()
    if suspended is not None and status is RunStatus.PENDING:
        return _park(state, suspended)
    stored: StoredValue | None = None
    if status is RunStatus.SUCCEEDED:
        try:
            stored = store_value(
                value,
                artifacts_url=session.artifacts_url,
                inline_limit=session.inline_limit,
                describe=lambda: f"result of workflow {workflow.name}",
            )
        except SerializationError as exc:
            exc.run_id = state.run_id
            status, error = RunStatus.FAILED, exc
    session.recorder.unwatch(state.run_id)
    session.recorder.run_update(state.run_id, _end_fields(status, stored, error, interrupted))
    session.recorder.flush()
    refused = session.recorder.take_refused(state.run_id)
    if refused:
        status, error = _fail_refused(state, refused, status, error)
        if status is RunStatus.FAILED:
            stored = None
    if status is RunStatus.CANCELLED:
        # Steps still running after the grace period, child runs that had not ended
        # yet, and the run's queued work end with the run: nothing stays RUNNING
        # under a cancelled run, and no worker picks up its steps later.
        closing.close_run(session.store, state.run_id, _cancel_message(interrupted))
    elif session.uses_queue:
        # Outcomes no one collected (a coordinator crashed before a resume that gave
        # the step a new attempt) do not linger in the queue.
        queue.drop_steps(session.store, state.run_id)
    if interrupted is not None:
        raise interrupted
    return RunOutcome(state.run_id, status, stored, error)


def _fail_refused(
    state: RunState,
    refused: list[Refusal],
    status: RunStatus,
    error: BaseException | None,
) -> tuple[RunStatus, BaseException | None]:
    """Rows of this run the database refused (values that got past the checks at the
    call): each step they belong to, and the run, fail with an error naming the value."""
    session = state.session
    for seq in dict.fromkeys(r.seq for r in refused if r.seq >= 0):
        first = next(r for r in refused if r.seq == seq)
        problem = first.error()
        session.store.fail_step(state.run_id, seq, qualified_name(type(problem)), problem.message)
    if status is RunStatus.SUCCEEDED:
        status, error = RunStatus.FAILED, refused[0].error()
        fields = _end_fields(status, None, error)
        fields.update(result_serializer=None, result_inline=None, result_ref=None, result_type=None)
        session.recorder.run_update(state.run_id, fields)
        session.recorder.flush()
    return status, error


# A run waiting for a signal without a timeout is queued this far ahead; the
# signal makes it claimable at once.
_NO_DEADLINE = 10 * 365 * 24 * 3600.0


def _park(state: RunState, suspended: Suspended) -> RunOutcome:
    """Record the run as PENDING until it wakes, and queue it for whoever continues it."""
    session = state.session
    wake_at = suspended.wake_at if suspended.wake_at is not None else time.time() + _NO_DEADLINE
    session.recorder.unwatch(state.run_id)
    session.recorder.flush()  # the wait's deadline is durable before anyone may claim the run
    row = session.store.get_run(state.run_id)
    if row is None or not row.parent_id:
        # Queued before the run is marked PENDING: a crash in between leaves a RUNNING run
        # that is queued (continued when due), never a PENDING run no one will claim.
        # A child run is continued by its parent's replay, never on its own.
        queue.enqueue_run(
            session.store,
            state.run_id,
            queue=(row.queue if row is not None and row.queue else "default"),
            priority=(row.priority if row is not None and row.priority else 0),
            not_before=wake_at,
        )
    session.recorder.run_update(
        state.run_id, {"status": str(RunStatus.PENDING), "wake_at": wake_at}
    )
    session.recorder.flush()
    return RunOutcome(state.run_id, RunStatus.PENDING, wake_at=wake_at)


def _cancel_message(interrupted: BaseException | None) -> str:
    if isinstance(interrupted, Terminated):
        return "the run was interrupted by SIGTERM (its process was asked to stop)"
    if interrupted is not None:
        return "the run was interrupted by Ctrl-C (SIGINT)"
    return "the run was cancelled"


def _end_fields(
    status: RunStatus,
    stored: StoredValue | None,
    error: BaseException | None,
    interrupted: BaseException | None = None,
) -> dict[str, Any]:
    fields: dict[str, Any] = {"status": str(status), "ended_at": time.time()}
    if stored is not None:
        fields.update(
            result_serializer=stored.serializer,
            result_inline=stored.inline,
            result_ref=stored.ref,
            result_type=stored.type_name,
        )
    if error is not None and status is RunStatus.FAILED:
        text = "".join(traceback.format_exception(error))
        root = error.root_error if isinstance(error, UpstreamFailedError) else None
        if root is not None:
            # The body re-raised a skip: show where the failing step really failed.
            text = (
                "".join(traceback.format_exception(root))
                + "\nThe failure above made a step the workflow waited for be skipped:\n\n"
                + text
            )
        error_type = qualified_name(type(error))
        message = describe_error(error)
        if isinstance(error, StepFailedError) and error.error_type:
            # The step's exception could not travel back as an object (another
            # process): report its own type and message, as the step's record does.
            error_type = error.error_type
            message = message.removeprefix(f"{error.error_type}: ")
        fields.update(error_type=error_type, error_message=message, traceback=text)
    elif status is RunStatus.CANCELLED:
        fields.update(error_type="Cancelled", error_message=_cancel_message(interrupted))
    return fields


def fresh_state(
    session: Session,
    run_id: str,
    workflow: Workflow[Any, Any],
    recorded: dict[int, Any],
    **kwargs: Any,
) -> RunState:
    from keel.executors import default_concurrency

    # An explicit limit for this session (`keel run --max-concurrency`) wins over the
    # workflow's default.
    limit = session.max_concurrency or workflow.max_concurrency or default_concurrency()
    state = RunState(session, run_id, workflow, recorded, max_concurrency=limit, **kwargs)
    session.recorder.watch_cancel(run_id, session.cancel)
    return state
