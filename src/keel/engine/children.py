"""Child runs: a workflow called inside another workflow's body.

The child gets a deterministic id (`<parent id>.<position>`) so that replaying the
parent finds and continues the same child run.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from keel.engine.execute import execute, fresh_state, new_run_row, record_new_run
from keel.engine.run import RunState, StepState, _substitute
from keel.errors import ChildDepthError, ConfigError, Suspended
from keel.status import REUSABLE_STEP, RunStatus

if TYPE_CHECKING:
    from keel.sdk.definitions import Workflow


# How deep child runs may nest (root = 0): a workflow that calls itself with no base
# case would otherwise start child runs until memory or the store gives out.
DEFAULT_MAX_CHILD_DEPTH = 32


def max_child_depth() -> int:
    raw = os.environ.get("KEEL_MAX_CHILD_DEPTH", "").strip()
    if not raw:
        return DEFAULT_MAX_CHILD_DEPTH
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"KEEL_MAX_CHILD_DEPTH must be a whole number of at least 1, got {raw!r}",
            hint=f"Unset it for the default ({DEFAULT_MAX_CHILD_DEPTH}) or set e.g. 64",
        )
    return value


def _describe_chain(names: tuple[str, ...]) -> str:
    """`a -> b -> a`, with repeats folded: `recurse (33 times)`."""
    folded: list[tuple[str, int]] = []
    for name in names:
        if folded and folded[-1][0] == name:
            folded[-1] = (name, folded[-1][1] + 1)
        else:
            folded.append((name, 1))
    parts = [name if n == 1 else f"{name} ({n} times)" for name, n in folded]
    if len(parts) > 8:
        parts = [*parts[:4], f"... {len(parts) - 8} more ...", *parts[-4:]]
    return " -> ".join(parts)


def check_depth(parent: RunState, workflow: Workflow[Any, Any]) -> None:
    """Refuse a child run deeper than the limit, in the body that would start it: the
    error fails that run, and each run above it fails in turn unless its body handles
    the error, so the whole chain ends."""
    depth = len(parent.chain)  # the new child's depth
    limit = max_child_depth()
    if depth <= limit:
        return
    raise ChildDepthError(
        f"child run depth limit reached: workflow {workflow.name!r} would start at depth "
        f"{depth}, over the limit of {limit} (chain from the root run: "
        f"{_describe_chain(parent.chain)})",
        run_id=parent.run_id,
        hint="A workflow that calls itself needs a case that stops the recursion; if the "
        "depth is intended, raise KEEL_MAX_CHILD_DEPTH, then `keel retry` the run",
    )


def start_child(parent: RunState, step: StepState) -> None:
    thread = threading.Thread(
        target=_child_main, args=(parent, step), name=f"keel-child-{step.child_run_id}", daemon=True
    )
    thread.start()


def _child_main(parent: RunState, step: StepState) -> None:
    workflow = step.workflow
    assert workflow is not None and step.child_run_id is not None
    session = parent.session
    try:
        for dep in step.deps:
            dep.result()  # the child starts once its inputs exist
        args = _substitute(step.args, True)
        kwargs = _substitute(step.kwargs, True)
        from keel.executors.base import resolve_refs

        args = resolve_refs(args, session.artifacts_url)
        kwargs = resolve_refs(kwargs, session.artifacts_url)
        bound = workflow.signature.bind(*args, **kwargs)
        params = workflow.validate(bound.arguments, require_json=False)
        child_id = step.child_run_id
        store = session.store
        recorded: dict[int, Any] = {}
        existing = store.get_run(child_id)
        reused_from = None
        if existing is not None:
            recorded = {row.seq: row for row in store.load_steps(child_id)}
            session.recorder.run_update(
                child_id, {"status": str(RunStatus.RUNNING), "ended_at": None}
            )
        else:
            row = new_run_row(
                store,
                child_id,
                workflow,
                workflow.params_json(params),
                executor=session.executor_name,
                parent_id=parent.run_id,
                parent_seq=step.future.seq,
            )
            record_new_run(session, row, params)
            if parent.reused_from is not None:
                reused_from = f"{parent.reused_from}.{step.future.seq}"
                recorded = {
                    r.seq: r for r in store.load_steps(reused_from) if r.status in REUSABLE_STEP
                }
        state = fresh_state(
            session,
            child_id,
            workflow,
            recorded,
            strict_replay=reused_from is None,
            reused_from=reused_from,
        )
        state.chain = (*parent.chain, workflow.name)
        outcome = execute(state, params)
    except BaseException as exc:
        parent.finish_child(step, None, exc)
        return
    if outcome.status is RunStatus.SUCCEEDED:
        parent.finish_child(step, outcome.stored, None)
    elif outcome.status is RunStatus.PENDING:
        # The child parked itself (a long sleep or a signal wait): so does the parent,
        # which continues the child by replay when it wakes.
        parent.finish_child(
            step, None, Suspended(parent.run_id, outcome.wake_at, f"child run {child_id} waits")
        )
    else:
        assert outcome.error is not None
        parent.finish_child(step, None, outcome.error)
