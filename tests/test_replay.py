"""Replay: resume of failed, cancelled and crashed runs, the non-determinism error,
and `keel.retry` (a new run that reuses the succeeded steps of an old one)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import keel
from keel.errors import RunFailedError, RunStateError
from keel.store.metadata import open_store
from keel.store.schema import steps as steps_table

_lock = threading.Lock()
_calls: Counter[str] = Counter()
_broken: set[str] = set()


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    _calls.clear()
    _broken.clear()
    yield
    _broken.clear()


def _count(name: str) -> None:
    with _lock:
        _calls[name] += 1


@keel.task(name="replay_a")
def step_a(x: int) -> int:
    _count(f"a{x}")
    return x + 1


@keel.task(name="replay_b")
def step_b(x: int) -> int:
    _count(f"b{x}")
    return x * 2


@keel.task(name="replay_c")
def step_c(x: int) -> int:
    _count(f"c{x}")
    return x * 3


@keel.task(name="replay_flaky")
def flaky(x: int) -> int:
    _count(f"flaky{x}")
    if "flaky" in _broken:
        raise RuntimeError(f"flaky is broken for {x}")
    return x - 1


@keel.workflow(name="replay_pipeline")
def pipeline(n: int) -> dict[str, Any]:
    firsts = step_a.map(range(n))
    doubled = [step_b.submit(f) for f in firsts]
    fixed = flaky(sum(keel.gather(doubled)))
    return {"fixed": fixed, "last": step_c(fixed)}


def _snapshot(run_id: str) -> list[dict[str, Any]]:
    """Every recorded column of every step of the run, for before/after comparisons."""
    return [dict(r._mapping) for r in open_store().load_steps(run_id)]


# -- resume -----------------------------------------------------------------------------


def test_resume_of_failed_run_reruns_only_unfinished_steps(backend: str) -> None:
    _broken.add("flaky")
    handle = keel.run(pipeline, n=3)
    assert handle.status == "FAILED"
    run = keel.Client().run(handle.id)
    assert [s.status for s in run.steps] == ["SUCCEEDED"] * 6 + ["FAILED"]
    assert _calls == Counter({"a0": 1, "a1": 1, "a2": 1, "b1": 1, "b2": 1, "b3": 1, "flaky12": 1})

    _broken.clear()
    resumed = keel.resume(handle.id)
    assert resumed.id == handle.id
    assert resumed.status == "SUCCEEDED"
    assert resumed.result() == {"fixed": 11, "last": 33}
    # Recorded steps did not run again; the failed one and the new one did.
    assert _calls == Counter(
        {"a0": 1, "a1": 1, "a2": 1, "b1": 1, "b2": 1, "b3": 1, "flaky12": 2, "c11": 1}
    )
    run = keel.Client().run(handle.id)
    assert run.status == "SUCCEEDED"
    assert run.error_type is None
    assert len(run.steps) == 8
    assert all(s.status == "SUCCEEDED" for s in run.steps)
    flaky_step = run.step("replay_flaky-6")
    assert [(a.number, a.status) for a in flaky_step.attempts] == [
        (1, "FAILED"),
        (2, "SUCCEEDED"),
    ]
    assert flaky_step.attempts[0].error_type == "RuntimeError"


def test_resume_of_succeeded_run_is_a_no_op(backend: str) -> None:
    handle = keel.run(pipeline, n=2)
    assert handle.result() == {"fixed": 5, "last": 15}
    before = _snapshot(handle.id)
    calls = Counter(_calls)
    run_before = keel.Client().run(handle.id)

    again = keel.resume(handle.id)
    assert again.id == handle.id
    assert again.result() == {"fixed": 5, "last": 15}
    assert _calls == calls
    assert _snapshot(handle.id) == before
    run_after = keel.Client().run(handle.id)
    assert run_after.ended_at == run_before.ended_at
    assert run_after.status == "SUCCEEDED"


def test_resume_after_lost_step_records(backend: str) -> None:
    """A crash can lose the last records: those steps run again, the others do not."""
    handle = keel.run(pipeline, n=3)
    assert handle.result() == {"fixed": 11, "last": 33}
    store = open_store()
    with store.engine.begin() as conn:
        conn.execute(
            steps_table.delete().where(steps_table.c.run_id == handle.id, steps_table.c.seq >= 4)
        )
    store.update_run(handle.id, status="RUNNING", ended_at=None)
    _calls.clear()

    resumed = keel.resume(handle.id)
    assert resumed.result() == {"fixed": 11, "last": 33}
    assert _calls == Counter({"b2": 1, "b3": 1, "flaky12": 1, "c11": 1})
    assert [s.key for s in keel.Client().run(handle.id).steps] == [
        "replay_a-0",
        "replay_a-1",
        "replay_a-2",
        "replay_b-3",
        "replay_b-4",
        "replay_b-5",
        "replay_flaky-6",
        "replay_c-7",
    ]


def test_resume_continues_a_failed_child_run(backend: str) -> None:
    @keel.workflow(name="replay_child")
    def kid(x: int) -> int:
        return flaky(step_a(x))

    @keel.workflow(name="replay_parent")
    def parent(x: int) -> int:
        return step_b(kid(step_c(x)))

    _broken.add("flaky")
    handle = keel.run(parent, x=1)
    assert handle.status == "FAILED"
    child_id = f"{handle.id}.1"
    assert keel.Client().run(child_id).status == "FAILED"
    with pytest.raises(RunStateError, match="child"):
        keel.resume(child_id)

    _broken.clear()
    resumed = keel.resume(handle.id)
    assert resumed.result() == (3 + 1 - 1) * 2
    assert _calls == Counter({"c1": 1, "a3": 1, "flaky4": 2, "b3": 1})
    child = keel.Client().run(child_id)
    assert child.status == "SUCCEEDED"
    assert child.parent_id == handle.id
    assert [r.id for r in keel.Client().run(handle.id).children()] == [child_id]


def test_resume_refuses_a_run_alive_in_another_process(backend: str) -> None:
    handle = keel.run(pipeline, n=1)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        open_store().update_run(handle.id, status="RUNNING", ended_at=None, pid=owner.pid)
        with pytest.raises(RunStateError, match=f"still running in process {owner.pid}"):
            keel.resume(handle.id)
        _calls.clear()
        forced = keel.resume(handle.id, force=True)
        assert forced.result() == {"fixed": 1, "last": 3}
        assert _calls == Counter()  # everything was recorded already
    finally:
        owner.kill()
        owner.wait()


# -- non-determinism --------------------------------------------------------------------


def _nd_variant(second: keel.Task[[int], int]) -> keel.Workflow[[], int]:
    """The same workflow (name and code location) with a different call at position 1."""

    @keel.workflow(name="replay_nd")
    def nd_flow() -> int:
        first = step_a(1)
        return second(first)

    return nd_flow


def test_nondeterministic_replay_names_both_calls(backend: str) -> None:
    handle = keel.run(_nd_variant(step_b))
    assert handle.result() == 4
    store = open_store()
    # Make it resumable (as if it had failed after recording its steps).
    store.update_run(handle.id, status="FAILED")
    before = _snapshot(handle.id)

    _nd_variant(step_c)  # the code changed: position 1 now calls replay_c
    resumed = keel.resume(handle.id)
    assert resumed.status == "FAILED"
    run = keel.Client().run(handle.id)
    assert run.error_type == "keel.errors.NonDeterminismError"
    message = run.error_message or ""
    assert "'replay_b'" in message
    assert "'replay_c'" in message
    assert "replay_b-1" in message
    assert run.traceback and "NonDeterminismError" in run.traceback
    with pytest.raises(RunFailedError, match="NonDeterminismError"):
        resumed.result()
    # Nothing recorded was changed or lost, and nothing ran again.
    assert _snapshot(handle.id) == before
    assert _calls == Counter({"a1": 1, "b2": 1})


def test_nondeterminism_task_versus_child_workflow(backend: str) -> None:
    @keel.workflow(name="replay_nd_kid")
    def nd_kid(x: int) -> int:
        return step_c(x)

    def variant(use_child: bool) -> keel.Workflow[[], int]:
        @keel.workflow(name="replay_nd_kind")
        def nd_kind() -> int:
            return nd_kid(1) if use_child else step_c(1)

        return nd_kind

    handle = keel.run(variant(False))
    assert handle.result() == 3
    open_store().update_run(handle.id, status="FAILED")
    variant(True)
    assert keel.resume(handle.id).status == "FAILED"
    run = keel.Client().run(handle.id)
    assert run.error_type == "keel.errors.NonDeterminismError"
    assert "task 'replay_c'" in (run.error_message or "")
    assert "workflow 'replay_nd_kid'" in (run.error_message or "")
    assert run.children() == []


# -- retry -------------------------------------------------------------------------------


def test_retry_reuses_succeeded_steps(backend: str) -> None:
    _broken.add("flaky")
    old = keel.run(pipeline, n=2)
    assert old.status == "FAILED"
    old_snapshot = _snapshot(old.id)
    _broken.clear()

    new = keel.retry(old.id)
    assert new.id != old.id
    assert new.status == "SUCCEEDED"
    assert new.result() == {"fixed": 5, "last": 15}
    assert _calls == Counter({"a0": 1, "a1": 1, "b1": 1, "b2": 1, "flaky6": 2, "c5": 1})

    run = keel.Client().run(new.id)
    assert run.retry_of == old.id
    assert run.params == {"n": 2}
    by_key = {s.key: s for s in run.steps}
    for key in ["replay_a-0", "replay_a-1", "replay_b-2", "replay_b-3"]:
        assert by_key[key].cached_from == f"{old.id}/{key}"
        assert by_key[key].output() == keel.Client().run(old.id).step(key).output()
    assert by_key["replay_flaky-4"].cached_from is None
    assert by_key["replay_flaky-4"].status == "SUCCEEDED"
    assert by_key["replay_c-5"].cached_from is None
    # The old run is left exactly as it was.
    assert keel.Client().run(old.id).status == "FAILED"
    assert _snapshot(old.id) == old_snapshot
    # Newest first: the retry is listed before the run it retried.
    assert [r.id for r in keel.Client().runs(workflow="replay_pipeline")] == [new.id, old.id]


def test_retry_with_changed_code_reuses_up_to_the_change(backend: str) -> None:
    _broken.add("flaky")

    def variant(fixed: bool) -> keel.Workflow[[int], int]:
        @keel.workflow(name="replay_changing")
        def changing(x: int) -> int:
            a = step_a(x)
            b = step_b(a)
            # The fix: call step_c instead of the broken flaky at position 2.
            c = step_c(b) if fixed else flaky(b)
            return step_a(c)

        return changing

    old = keel.run(variant(False), x=1)
    assert old.status == "FAILED"
    _calls.clear()

    new = keel.retry(old.id, workflow=variant(True))
    assert new.result() == 13
    assert _calls == Counter({"c4": 1, "a12": 1})
    run = keel.Client().run(new.id)
    assert [(s.key, s.cached_from is not None) for s in run.steps] == [
        ("replay_a-0", True),
        ("replay_b-1", True),
        ("replay_c-2", False),
        ("replay_a-3", False),
    ]


def test_retry_after_divergence_reuses_nothing_later(backend: str) -> None:
    """After the first position where the code differs, later recorded steps are not
    reused even when their task names match again."""

    def variant(extra: bool) -> keel.Workflow[[], int]:
        @keel.workflow(name="replay_diverge")
        def diverge() -> int:
            a = step_a(1)
            if extra:
                a = step_c(a)
            b = step_b(a)
            return flaky(b)

        return diverge

    _broken.add("flaky")
    old = keel.run(variant(False))
    assert old.status == "FAILED"
    _broken.clear()
    _calls.clear()
    new = keel.retry(old.id, workflow=variant(True))
    assert new.result() == 11
    assert _calls == Counter({"c2": 1, "b6": 1, "flaky12": 1})
    reused = [s.key for s in keel.Client().run(new.id).steps if s.cached_from]
    assert reused == ["replay_a-0"]


def test_retry_reuses_the_succeeded_steps_of_a_failed_child(backend: str) -> None:
    @keel.workflow(name="replay_retry_kid")
    def kid(x: int) -> int:
        return flaky(step_a(x))

    @keel.workflow(name="replay_retry_parent")
    def parent(x: int) -> int:
        return step_b(kid(step_c(x)))

    _broken.add("flaky")
    old = keel.run(parent, x=1)
    assert old.status == "FAILED"
    _broken.clear()
    _calls.clear()

    new = keel.retry(old.id)
    assert new.result() == 6
    # step_c (parent) and step_a (child) were reused; flaky and step_b ran.
    assert _calls == Counter({"flaky4": 1, "b3": 1})
    kid_run = keel.Client().run(f"{new.id}.1")
    assert kid_run.parent_id == new.id
    assert kid_run.status == "SUCCEEDED"
    assert kid_run.step("replay_a-0").cached_from == f"{old.id}.1/replay_a-0"
    assert keel.Client().run(old.id).status == "FAILED"
    assert keel.Client().run(f"{old.id}.1").status == "FAILED"


# -- a step in flight at the crash ---------------------------------------------------------

_attempts_seen: list[tuple[str, int, str | None]] = []


@keel.task(name="replay_ctx")
def ctx_step(x: int) -> int:
    ctx = keel.context()
    with _lock:
        _attempts_seen.append((ctx.run_id, ctx.attempt, ctx.idempotency_key))
    return x + 10


@keel.workflow(name="replay_in_flight")
def in_flight(x: int) -> int:
    return step_b(ctx_step(step_a(x)))


def test_step_in_flight_at_a_crash_runs_again_with_the_same_idempotency_key(
    backend: str,
) -> None:
    _attempts_seen.clear()
    handle = keel.run(in_flight, x=1)
    assert handle.result() == 24
    # What the store holds when the process dies during step 1: it was started
    # (RUNNING, attempt 1) and nothing after it was recorded.
    store = open_store()
    with store.engine.begin() as conn:
        conn.execute(
            steps_table.update()
            .where(steps_table.c.run_id == handle.id, steps_table.c.seq == 1)
            .values(
                status="RUNNING",
                ended_at=None,
                output_serializer=None,
                output_inline=None,
                output_ref=None,
                output_hash=None,
                output_type=None,
                output_size=None,
            )
        )
        conn.execute(
            steps_table.delete().where(steps_table.c.run_id == handle.id, steps_table.c.seq >= 2)
        )
    store.update_run(handle.id, status="RUNNING", ended_at=None)

    assert keel.resume(handle.id).result() == 24
    (first_run, first, first_key), (again_run, again, again_key) = _attempts_seen
    assert first_run == again_run == handle.id
    assert (first, again) == (1, 2)  # at-least-once: a new attempt, numbered on
    assert first_key is not None and again_key == first_key
    assert _calls == Counter({"a1": 1, "b12": 2})
    step = keel.Client().run(handle.id).step("replay_ctx-1")
    assert step.status == "SUCCEEDED"
    assert [a.number for a in step.attempts] == [1, 2]


# -- resume on the processes executor -----------------------------------------------------------


@keel.task(name="replay_proc_step")
def proc_step(i: int, out: str, broken_marker: str) -> int:
    import os

    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"{i}\n")
    if i == 3 and os.path.exists(broken_marker):
        raise RuntimeError("step 3 is broken")
    return i * i


@keel.workflow(name="replay_proc", executor="processes")
def proc_flow(out: str, broken_marker: str) -> int:
    return sum(keel.gather(proc_step.map(range(5), out=out, broken_marker=broken_marker)))


def test_resume_on_the_processes_executor(backend: str, tmp_path: Any) -> None:
    out = tmp_path / "ran.txt"
    marker = tmp_path / "broken"
    marker.touch()
    handle = keel.run(proc_flow, out=str(out), broken_marker=str(marker))
    assert handle.status == "FAILED"
    assert sorted(out.read_text().split()) == ["0", "1", "2", "3", "4"]
    marker.unlink()
    assert keel.resume(handle.id).result() == sum(i * i for i in range(5))
    assert sorted(out.read_text().split()) == ["0", "1", "2", "3", "3", "4"]


@keel.task(name="replay_two_tries", retries=1, retry_delay=0)
def two_tries(x: int) -> int:
    _count(f"two_tries attempt {keel.context().attempt}")
    if "two_tries" in _broken:
        raise RuntimeError("still broken")
    return x


def test_a_resumed_step_gets_its_retries_again(backend: str) -> None:
    @keel.workflow(name="replay_retries_again")
    def wf() -> int:
        return two_tries(step_a(1))

    _broken.add("two_tries")
    handle = keel.run(wf)
    assert handle.status == "FAILED"
    assert keel.resume(handle.id).status == "FAILED"
    assert _calls == Counter({"a1": 1, **{f"two_tries attempt {n}": 1 for n in (1, 2, 3, 4)}})
    step = keel.Client().run(handle.id).step("replay_two_tries-1")
    assert [(a.number, a.status) for a in step.attempts] == [(n, "FAILED") for n in (1, 2, 3, 4)]

    _broken.clear()
    assert keel.resume(handle.id).result() == 2
    step = keel.Client().run(handle.id).step("replay_two_tries-1")
    assert [a.number for a in step.attempts] == [1, 2, 3, 4, 5]
    assert step.attempts[-1].status == "SUCCEEDED"
