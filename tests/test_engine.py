"""The durable engine: steps, futures, dependency edges, dynamic graphs, child runs,
failures, skipped dependents, captured output, statuses, concurrency limits and
cancellation."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import keel
from keel.errors import RunFailedError

# -- shared side effects (the threads executor runs steps in this process) ---------------

_lock = threading.Lock()
_events: list[str] = []
_gates: dict[str, threading.Event] = {}

WAIT = 30.0  # a generous bound for waits that should end at once; never a measurement


def _log(text: str) -> None:
    with _lock:
        _events.append(text)


def _gate(name: str) -> threading.Event:
    with _lock:
        return _gates.setdefault(name, threading.Event())


@pytest.fixture(autouse=True)
def _reset_side_effects() -> Iterator[None]:
    with _lock:
        _events.clear()
        _gates.clear()
    yield
    with _lock:
        for gate in _gates.values():
            gate.set()  # never leave a step thread waiting


# -- tasks ----------------------------------------------------------------------------


@keel.task(name="eng_inc")
def inc(x: int) -> int:
    _log(f"inc {x}")
    return x + 1


@keel.task(name="eng_add")
def add(x: int, y: int) -> int:
    return x + y


@keel.task(name="eng_scale")
def scale(x: int, factor: int = 1, offset: int = 0) -> int:
    return x * factor + offset


@keel.task(name="eng_total")
def total(xs: list[int]) -> int:
    return sum(xs)


@keel.task(name="eng_fail")
def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


@keel.task(name="eng_wait_gate")
def wait_gate(name: str, value: int) -> int:
    _log(f"start {name}")
    if not _gate(name).wait(WAIT):
        raise TimeoutError(f"gate {name} never opened")
    _log(f"end {name}")
    return value


@keel.task(name="eng_open_gate")
def open_gate(x: int, name: str) -> int:
    _log(f"open {name} after {x}")
    _gate(name).set()
    return x


def _run(wf: keel.Workflow[..., Any], **params: Any) -> keel.Run:
    handle = keel.run(wf, **params)
    return keel.Client().run(handle.id)


# -- calling, submitting, mapping -------------------------------------------------------


@keel.workflow(name="eng_basics")
def basics(n: int = 3) -> dict[str, Any]:
    direct = inc(1)
    fut = inc.submit(10)
    mapped = scale.map(range(n), factor=10, offset=1)
    done, not_done = keel.wait(mapped)
    return {
        "direct": direct,
        "future": fut.result(),
        "mapped": keel.gather(mapped),
        "wait": [len(done), len(not_done)],
        "sum": total(mapped),
    }


def test_call_submit_map_wait_gather(backend: str) -> None:
    run = _run(basics, n=3)
    assert run.status == "SUCCEEDED"
    assert run.result() == {
        "direct": 2,
        "future": 11,
        "mapped": [1, 11, 21],
        "wait": [3, 0],
        "sum": 33,
    }
    assert [s.key for s in run.steps] == [
        "eng_inc-0",
        "eng_inc-1",
        "eng_scale-2",
        "eng_scale-3",
        "eng_scale-4",
        "eng_total-5",
    ]
    assert all(s.status == "SUCCEEDED" for s in run.steps)
    # The list of futures given to `total` is one edge per mapped step.
    assert run.step("eng_total-5").deps == [2, 3, 4]
    assert run.step("eng_scale-3").output() == 11


def test_futures_inside_containers_are_edges(backend: str) -> None:
    @keel.workflow(name="eng_nested_edges")
    def wf() -> int:
        a = inc.submit(1)
        b = inc.submit(2)
        c = total.submit([a, b, 5])
        d = add.submit(x=c, y=a)
        return d.result()

    run = _run(wf)
    assert run.result() == (2 + 3 + 5) + 2
    assert run.step("eng_total-2").deps == [0, 1]
    assert sorted(run.step("eng_add-3").deps) == [0, 2]
    assert run.step("eng_inc-0").deps == []


def test_downstream_step_starts_without_the_body_blocking(backend: str) -> None:
    """`b` depends on `a`; the body never asks for a value, yet `b` runs once `a` is done,
    while the body is still busy (waiting for a signal only `b` gives)."""

    @keel.workflow(name="eng_no_block")
    def wf() -> list[str]:
        a = wait_gate.submit("a", 1)
        open_gate.submit(a, "b-ran")  # runs only after `a`
        _log("body submitted both")
        _gate("a").set()
        # Block the body on something only the downstream step can release.
        if not _gate("b-ran").wait(WAIT):
            raise TimeoutError("the downstream step never started")
        _log("body saw downstream")
        return list(_events)

    run = _run(wf)
    assert run.status == "SUCCEEDED"
    events = run.result()
    assert events.index("start a") < events.index("end a")
    assert events.index("body submitted both") < events.index("end a")
    assert events.index("end a") < events.index("open b-ran after 1")
    assert events.index("open b-ran after 1") < events.index("body saw downstream")
    assert run.step("eng_open_gate-1").deps == [0]


def test_independent_steps_run_concurrently(backend: str) -> None:
    """Two independent steps: the second starts while the first is still running
    (the first waits for a gate that only the second opens)."""

    @keel.workflow(name="eng_parallel")
    def wf() -> list[int]:
        a = wait_gate.submit("p", 1)
        b = open_gate.submit(2, "p")
        return keel.gather(a, b)

    run = _run(wf)
    assert run.result() == [1, 2]
    assert _events.index("start p") < _events.index("open p after 2") < _events.index("end p")


def test_wait_first_completed(backend: str) -> None:
    @keel.workflow(name="eng_wait_first")
    def wf() -> list[int]:
        slow = wait_gate.submit("slow", 1)
        fast = inc.submit(1)
        done, not_done = keel.wait([slow, fast], return_when="FIRST_COMPLETED")
        counts = [len(done), len(not_done)]
        _gate("slow").set()
        return [*counts, slow.result(), fast.result()]

    assert _run(wf).result() == [1, 1, 1, 2]


def test_workflow_may_return_futures(backend: str) -> None:
    @keel.workflow(name="eng_returns_futures")
    def wf() -> Any:
        one = inc.submit(1)
        return {"one": one, "many": inc.map([10, 20]), "pair": (one, 5)}

    assert _run(wf).result() == {"one": 2, "many": [11, 21], "pair": (2, 5)}


def test_empty_map_and_gather(backend: str) -> None:
    @keel.workflow(name="eng_empty")
    def wf() -> list[Any]:
        nothing = inc.map([])
        done, not_done = keel.wait(nothing)
        return [nothing, keel.gather(nothing), done, not_done]

    run = _run(wf)
    assert run.result() == [[], [], [], []]
    assert run.steps == []


def test_gather_raises_the_first_error_in_order(backend: str) -> None:
    @keel.workflow(name="eng_gather_error")
    def wf() -> str:
        futures = [inc.submit(1), fail.submit(2), fail.submit(3)]
        try:
            keel.gather(futures)
        except ValueError as exc:
            # Every failure the body does not look at fails the run; look at the last.
            return f"{exc}; then {futures[2].exception()}"
        return "no error"

    assert _run(wf).result() == "bad input 2; then bad input 3"


def test_wait_with_a_timeout_returns_what_is_done(backend: str) -> None:
    @keel.workflow(name="eng_wait_timeout")
    def wf() -> list[int]:
        slow = wait_gate.submit("wt", 1)
        fast = inc.submit(1)
        fast.result()
        done, not_done = keel.wait([slow, fast], timeout=0.05)
        counts = [len(done), len(not_done)]
        _gate("wt").set()
        return [*counts, slow.result()]

    assert _run(wf).result() == [1, 1, 1]


def test_wait_first_exception(backend: str) -> None:
    @keel.workflow(name="eng_wait_first_exception")
    def wf() -> list[Any]:
        slow = wait_gate.submit("fe", 1)
        bad = fail.submit(5)
        done, not_done = keel.wait([slow, bad], return_when="FIRST_EXCEPTION")
        summary = [[f.key for f in done], [f.key for f in not_done], str(bad.exception())]
        _gate("fe").set()
        return [*summary, slow.result()]

    assert _run(wf).result() == [["eng_fail-1"], ["eng_wait_gate-0"], "bad input 5", 1]


@keel.task(name="eng_calls_a_task")
def calls_a_task(x: int) -> int:
    # Inside a step, calling another task is a plain call, not a step of its own.
    return inc(x) + add(x, x)


def test_task_called_inside_a_step_is_a_plain_call(backend: str) -> None:
    @keel.workflow(name="eng_nested_call")
    def wf() -> int:
        return calls_a_task(3)

    run = _run(wf)
    assert run.result() == 4 + 6
    assert [s.key for s in run.steps] == ["eng_calls_a_task-0"]


def test_concurrent_runs_in_one_process(backend: str) -> None:
    @keel.workflow(name="eng_concurrent_a")
    def wf_a(n: int) -> int:
        return total(scale.map(range(n), factor=2))

    @keel.workflow(name="eng_concurrent_b")
    def wf_b(n: int) -> int:
        x = 0
        for _ in range(n):
            x = inc(x)
        return x

    results: dict[str, Any] = {}

    def start(name: str, wf: keel.Workflow[..., Any], n: int) -> None:
        results[name] = keel.run(wf, n=n)

    threads = [
        threading.Thread(target=start, args=(f"{kind}{i}", wf, 30))
        for i in range(3)
        for kind, wf in (("a", wf_a), ("b", wf_b))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert sorted(results) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    for name, handle in results.items():
        assert handle.result() == (sum(range(30)) * 2 if name.startswith("a") else 30)
        assert len(keel.Client().run(handle.id).steps) == 31 if name.startswith("a") else 30
    assert len({h.id for h in results.values()}) == 6


# -- dynamic graphs ----------------------------------------------------------------------


@keel.workflow(name="eng_dynamic")
def dynamic(limit: int) -> dict[str, Any]:
    x = 0
    while x < limit:  # the loop length depends on step values
        x = inc(x)
    branch = scale(x, factor=100) if x % 2 == 0 else scale(x, factor=-1)
    parts = add.map(range(x), y=branch)
    return {"x": x, "branch": branch, "total": total(parts)}


@pytest.mark.parametrize("limit", [2, 3])
def test_dynamic_graph_follows_values(backend: str, limit: int) -> None:
    run = _run(dynamic, limit=limit)
    out = run.result()
    branch = limit * 100 if limit % 2 == 0 else -limit
    assert out == {
        "x": limit,
        "branch": branch,
        "total": sum(i + branch for i in range(limit)),
    }
    expected = (
        [f"eng_inc-{i}" for i in range(limit)]
        + [f"eng_scale-{limit}"]
        + [f"eng_add-{limit + 1 + i}" for i in range(limit)]
        + [f"eng_total-{2 * limit + 1}"]
    )
    assert [s.key for s in run.steps] == expected


# -- child workflows ---------------------------------------------------------------------


@keel.workflow(name="eng_child")
def child(x: int, factor: int = 2) -> int:
    return scale(inc(x), factor=factor)


@keel.workflow(name="eng_parent")
def parent(x: int) -> dict[str, int]:
    first = child(x)
    second = child.submit(inc.submit(x), factor=3)
    return {"first": first, "second": second.result(), "after": inc(first)}


def test_child_workflows(backend: str) -> None:
    run = _run(parent, x=1)
    assert run.status == "SUCCEEDED"
    assert run.result() == {"first": 4, "second": 9, "after": 5}

    keys = [s.key for s in run.steps]
    assert keys == ["eng_child-0", "eng_inc-1", "eng_child-2", "eng_inc-3"]
    first, _, second, _ = run.steps
    assert first.kind == "workflow" and second.kind == "workflow"
    assert first.child_run_id == f"{run.id}.0"
    assert second.child_run_id == f"{run.id}.2"
    assert second.deps == [1]
    assert first.output() == 4

    children = {c.id: c for c in run.children()}
    assert set(children) == {f"{run.id}.0", f"{run.id}.2"}
    for c in children.values():
        assert c.parent_id == run.id
        assert c.workflow == "eng_child"
        assert c.status == "SUCCEEDED"
        assert [s.task for s in c.steps] == ["eng_inc", "eng_scale"]
    assert children[f"{run.id}.0"].result() == 4
    assert children[f"{run.id}.2"].params == {"x": 2, "factor": 3}
    # Child runs are not listed as top-level runs.
    assert [r.id for r in keel.Client().runs()] == [run.id]
    assert len(keel.Client().runs(include_children=True)) == 3


def test_failing_child_fails_the_parent(backend: str) -> None:
    @keel.workflow(name="eng_bad_child")
    def bad_child(x: int) -> int:
        return fail(x)

    @keel.workflow(name="eng_bad_parent")
    def bad_parent() -> int:
        return bad_child(7)

    run = _run(bad_parent)
    assert run.status == "FAILED"
    assert "bad input 7" in (run.error_message or "")
    (kid,) = run.children()
    assert kid.status == "FAILED"
    assert run.steps[0].status == "FAILED"
    assert kid.steps[0].status == "FAILED"


@keel.task(name="eng_array")
def array(n: int) -> Any:
    import numpy as np

    return np.arange(n)


@keel.workflow(name="eng_array_child")
def array_child(values: Any, scale: int = 2) -> int:
    return int(values.sum()) * scale


def test_child_workflow_with_non_json_arguments(backend: str) -> None:
    @keel.workflow(name="eng_array_parent")
    def wf(n: int) -> int:
        return array_child(array.submit(n), scale=3)

    run = _run(wf, n=5)
    assert run.result() == 30
    (kid,) = run.children()
    assert kid.status == "SUCCEEDED"
    assert kid.params["scale"] == 3
    assert "0, 1, 2, 3, 4" in str(kid.params["values"])  # shown, not JSON data


# -- failures ------------------------------------------------------------------------------


def test_failing_step_fails_the_run_with_traceback(backend: str) -> None:
    @keel.workflow(name="eng_fails")
    def wf() -> int:
        ok = inc(1)
        return fail(ok)

    handle = keel.run(wf)
    assert handle.status == "FAILED"
    with pytest.raises(RunFailedError) as info:
        handle.result()
    assert "bad input 2" in str(info.value)
    assert info.value.traceback and "ValueError: bad input 2" in info.value.traceback

    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.ended_at is not None
    assert run.error_type == "ValueError"
    assert run.error_message == "bad input 2"
    assert run.traceback and "bad input 2" in run.traceback

    ok_step, bad_step = run.steps
    assert ok_step.status == "SUCCEEDED" and ok_step.output() == 2
    assert bad_step.status == "FAILED"
    assert bad_step.error_type == "ValueError"
    assert bad_step.error_message == "bad input 2"
    (attempt,) = bad_step.attempts
    assert attempt.status == "FAILED"
    assert attempt.error_type == "ValueError"
    assert attempt.traceback is not None
    assert "def fail" in attempt.traceback or "in fail" in attempt.traceback
    assert "ValueError: bad input 2" in attempt.traceback


def test_dependents_of_a_failed_step_are_skipped(backend: str) -> None:
    @keel.workflow(name="eng_skips")
    def wf() -> int:
        bad = fail.submit(1)
        after = inc.submit(bad)
        after_after = add.submit(after, 1)
        unrelated = inc.submit(100)
        return unrelated.result() + after_after.result()

    run = _run(wf)
    assert run.status == "FAILED"
    statuses = {s.key: s.status for s in run.steps}
    assert statuses == {
        "eng_fail-0": "FAILED",
        "eng_inc-1": "SKIPPED",
        "eng_add-2": "SKIPPED",
        "eng_inc-3": "SUCCEEDED",
    }
    assert run.step("eng_add-2").attempts == []
    assert run.step("eng_inc-1").error_type == "keel.errors.UpstreamFailedError"
    assert "eng_fail-0" in (run.step("eng_inc-1").error_message or "")
    # The skipped steps never ran.
    assert "inc 100" in _events
    assert not any(e.startswith("inc ") and e != "inc 100" for e in _events)


def test_skip_cascade_names_the_root_failure(backend: str) -> None:
    @keel.workflow(name="eng_skip_root")
    def wf() -> int:
        bad = fail.submit(1)
        after = inc.submit(bad)
        return add.submit(after, 1).result()

    run = _run(wf)
    assert run.status == "FAILED"
    # eng_inc-1 did not fail, it was skipped: the message must point at eng_fail-0.
    assert "eng_fail-0" in (run.step("eng_add-2").error_message or "")
    # The run's error leads a user to the step that raised and its error.
    assert "eng_fail-0" in (run.error_message or "")


def test_unobserved_failure_still_fails_the_run(backend: str) -> None:
    @keel.workflow(name="eng_unobserved")
    def wf() -> str:
        fail.submit(1)
        return "body finished"

    run = _run(wf)
    assert run.status == "FAILED"
    assert run.error_type == "ValueError"


def test_failure_caught_by_the_body_lets_the_run_succeed(backend: str) -> None:
    @keel.workflow(name="eng_caught")
    def wf() -> str:
        try:
            fail(3)
        except ValueError as exc:
            return f"recovered from {exc}"
        return "not reached"

    run = _run(wf)
    assert run.status == "SUCCEEDED"
    assert run.result() == "recovered from bad input 3"
    assert run.steps[0].status == "FAILED"


# -- captured output ----------------------------------------------------------------------


@keel.task(name="eng_chatty", retries=1, retry_delay=0.0)
def chatty(tag: str) -> str:
    attempt = keel.context().attempt
    print(f"out {tag} attempt {attempt}")
    print(f"err {tag} attempt {attempt}", file=sys.stderr)
    logging.getLogger("eng.user").warning("log %s attempt %d", tag, attempt)
    if attempt == 1:
        raise RuntimeError("first attempt fails")
    return tag


def test_stdout_stderr_and_logging_captured_per_attempt(backend: str) -> None:
    @keel.workflow(name="eng_chatty_wf")
    def wf() -> list[str]:
        return keel.gather(chatty.map(["a", "b"]))

    run = _run(wf)
    assert run.result() == ["a", "b"]
    for step, tag in zip(run.steps, ["a", "b"], strict=True):
        first, second = step.attempts
        assert first.status == "FAILED" and second.status == "SUCCEEDED"
        for attempt in (first, second):
            text = attempt.logs()
            n = attempt.number
            assert f"out {tag} attempt {n}" in text
            assert f"err {tag} attempt {n}" in text
            assert f"log {tag} attempt {n}" in text
            assert "WARNING" in text
            # Nothing from the other attempt, nor from the other step.
            assert f"attempt {3 - n}" not in text
            other = "b" if tag == "a" else "a"
            assert f"out {other}" not in text
        whole = step.logs()
        assert f"out {tag} attempt 1" in whole and f"out {tag} attempt 2" in whole
        assert step.logs(attempt=2) == second.logs()


def test_unicode_output_is_captured(backend: str) -> None:
    @keel.task(name="eng_unicode")
    def unicode_out() -> str:
        text = "héllo wörld ✓ 数据 🚀"
        print(text)
        logging.getLogger("eng.user").warning("logged %s", text)
        return text

    @keel.workflow(name="eng_unicode_wf")
    def wf() -> str:
        return unicode_out()

    run = _run(wf)
    assert run.result() == "héllo wörld ✓ 数据 🚀"
    logs = run.steps[0].logs()
    assert "héllo wörld ✓ 数据 🚀\n" in logs
    assert "logged héllo wörld ✓ 数据 🚀" in logs


def test_output_outside_steps_is_not_captured(
    backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    @keel.workflow(name="eng_body_print")
    def wf() -> str:
        print("printed by the body")
        return inc(1)

    run = _run(wf)
    assert run.result() == 2
    assert "printed by the body" in capsys.readouterr().out
    assert "printed by the body" not in run.steps[0].logs()


# -- statuses and times ---------------------------------------------------------------------


def test_statuses_and_times_are_recorded(backend: str) -> None:
    @keel.workflow(name="eng_statuses")
    def wf() -> int:
        return inc(1)

    run = _run(wf)
    assert run.status == "SUCCEEDED"
    assert run.started_at is not None and run.ended_at is not None
    assert run.started_at <= run.ended_at
    assert run.error_type is None and run.traceback is None
    (step,) = run.steps
    assert step.status == "SUCCEEDED"
    assert step.started_at is not None and step.ended_at is not None
    assert step.started_at <= step.ended_at
    (attempt,) = step.attempts
    assert attempt.number == 1 and attempt.status == "SUCCEEDED"
    assert attempt.started_at is not None and attempt.ended_at is not None
    assert attempt.error_type is None and attempt.traceback is None


# -- concurrency limits -------------------------------------------------------------------


class _Gauge:
    """Counts steps running at once. Each step waits (bounded) until `target` steps have
    run together, so the maximum reaches the limit whenever the engine allows it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total_running = 0
        self.total_peak = 0

    def enter(self, name: str, target: int) -> None:
        with self.cond:
            self.running[name] = self.running.get(name, 0) + 1
            self.total_running += 1
            self.peak[name] = max(self.peak.get(name, 0), self.running[name])
            self.total_peak = max(self.total_peak, self.total_running)
            self.cond.notify_all()
            # Once the peak was reached nobody waits; until then, long enough for a loaded
            # machine to dispatch the others (bounded, so a broken limit cannot hang).
            self.cond.wait_for(lambda: self.peak[name] >= target, timeout=60.0)

    def leave(self, name: str) -> None:
        with self.cond:
            self.running[name] -= 1
            self.total_running -= 1
            self.cond.notify_all()


_gauge = _Gauge()


@keel.task(name="eng_gauged")
def gauged(i: int, target: int) -> int:
    _gauge.enter("gauged", target)
    _gauge.leave("gauged")
    return i


@keel.task(name="eng_limited", max_concurrency=2)
def limited(i: int, target: int) -> int:
    _gauge.enter("limited", target)
    _gauge.leave("limited")
    return i


@keel.workflow(name="eng_wf_limit", max_concurrency=3)
def wf_limit(n: int) -> list[int]:
    return keel.gather(gauged.map(range(n), target=3))


@keel.workflow(name="eng_task_limit", max_concurrency=8)
def task_limit(n: int) -> list[int]:
    a = limited.map(range(n), target=2)
    b = gauged.map(range(n), target=4)
    return keel.gather(a) + keel.gather(b)


def test_workflow_max_concurrency(backend: str) -> None:
    global _gauge
    _gauge = _Gauge()
    run = _run(wf_limit, n=9)
    assert run.result() == list(range(9))
    assert _gauge.peak["gauged"] == 3


def test_task_max_concurrency(backend: str) -> None:
    global _gauge
    _gauge = _Gauge()
    run = _run(task_limit, n=6)
    assert run.result() == list(range(6)) * 2
    assert _gauge.peak["limited"] == 2
    # The limited task does not hold back the others.
    assert _gauge.peak["gauged"] == 4
    assert _gauge.total_peak <= 8


# -- cancellation ---------------------------------------------------------------------------

_ran: list[int] = []


@keel.task(name="eng_cancellable")
def cancellable(i: int) -> int:
    with _lock:
        _ran.append(i)
    if i == 0 and not _gate("cancel-release").is_set():
        _gate("first-started").set()
        if not _gate("cancel-release").wait(WAIT):
            raise TimeoutError("never released")
    return i * 10


@keel.workflow(name="eng_cancel_wf", max_concurrency=1)
def cancel_wf(n: int) -> list[int]:
    first = cancellable.submit(0)
    rest = [cancellable.submit(i) for i in range(1, n)]  # queued behind the first
    # Cancellation ends the queued steps; only then let the first one finish.
    keel.wait(rest, timeout=WAIT)
    _gate("cancel-release").set()
    return keel.gather(first, rest)


def test_cancel_from_another_thread_then_resume(backend: str) -> None:
    _ran.clear()
    outcome: dict[str, Any] = {}

    def start() -> None:
        try:
            outcome["handle"] = keel.run(cancel_wf, n=5)
        except BaseException as exc:  # pragma: no cover - reported below
            outcome["error"] = exc

    runner = threading.Thread(target=start)
    runner.start()
    assert _gate("first-started").wait(WAIT)
    (running,) = keel.Client().runs(workflow="eng_cancel_wf")
    assert running.status == "RUNNING"
    keel.cancel(running.id)
    runner.join(WAIT)
    assert not runner.is_alive()
    assert "error" not in outcome, outcome.get("error")

    run = keel.Client().run(running.id)
    assert run.status == "CANCELLED"
    assert outcome["handle"].id == run.id
    with pytest.raises(RunFailedError, match="CANCELLED"):
        run.result()
    # Queued steps never started; the one running finished and its result is kept.
    assert _ran == [0]
    assert [(s.key, s.status) for s in run.steps] == [("eng_cancellable-0", "SUCCEEDED")]
    assert run.steps[0].output() == 0

    handle = keel.resume(run.id)
    assert handle.id == run.id
    assert handle.status == "SUCCEEDED"
    assert handle.result() == [0, 10, 20, 30, 40]
    assert sorted(_ran) == [0, 1, 2, 3, 4]  # step 0 was not executed again
    resumed = keel.Client().run(run.id)
    assert all(s.status == "SUCCEEDED" for s in resumed.steps)
    assert len(resumed.steps) == 5


def test_cancel_of_a_finished_run_changes_nothing(backend: str) -> None:
    @keel.workflow(name="eng_cancel_done")
    def wf() -> int:
        return inc(1)

    handle = keel.run(wf)
    assert keel.cancel(handle.id) == "SUCCEEDED"
    assert handle.status == "SUCCEEDED"
    assert handle.result() == 2


def test_cancel_of_a_run_whose_process_is_gone(backend: str) -> None:
    """A RUNNING record whose owner process no longer exists is marked CANCELLED at once."""

    @keel.workflow(name="eng_cancel_orphan")
    def wf() -> int:
        return inc(1)

    handle = keel.run(wf)
    from keel.store.metadata import open_store

    store = open_store()
    # Simulate a crash: the record says RUNNING, owned by a process that has exited.
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.update_run(handle.id, status="RUNNING", ended_at=None, pid=dead.pid)
    assert keel.cancel(handle.id) == "CANCELLED"
    assert keel.Client().run(handle.id).status == "CANCELLED"
    # Recorded steps are kept, and resuming finishes the run without running them.
    before = len(_events)
    assert keel.resume(handle.id).result() == 2
    assert len(_events) == before


def test_steps_never_awaited_still_complete(backend: str) -> None:
    """The run ends after the body and all its steps end: a step submitted and never
    awaited still completes and is recorded."""

    @keel.workflow(name="eng_fire_and_forget")
    def wf() -> str:
        inc.submit(41)
        return "done"

    run = _run(wf)
    assert run.result() == "done"
    assert run.steps[0].status == "SUCCEEDED"
    assert run.steps[0].output() == 42


@keel.task(name="eng_slow_retry", retries=1, retry_delay=300, retry_jitter=0)
def slow_retry() -> int:
    attempt = keel.context().attempt
    _log(f"slow_retry attempt {attempt}")
    if attempt == 1:
        raise RuntimeError("first attempt fails; the retry waits 300 s")
    return attempt


@pytest.mark.timeout(60)
def test_cancel_during_a_retry_backoff() -> None:
    @keel.workflow(name="eng_cancel_backoff")
    def wf() -> int:
        return slow_retry()

    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("handle", keel.run(wf)))
    runner.start()
    client = keel.Client()
    run_id = None
    for _ in range(3000):  # until attempt 1 is recorded as failed (the retry then waits)
        runs = client.runs(workflow="eng_cancel_backoff")
        if runs and runs[0].steps and runs[0].steps[0].attempts:
            run_id = runs[0].id
            break
        threading.Event().wait(0.01)
    assert run_id is not None
    keel.cancel(run_id)
    runner.join(10)  # liveness: cancellation is seen within about a second, not 300 s
    assert not runner.is_alive(), "the cancelled run waited for the retry backoff"
    assert client.run(run_id).status == "CANCELLED"
    # Resuming runs the attempt that was waiting, numbered without a gap.
    assert keel.resume(run_id).result() == 2
    assert _events == ["slow_retry attempt 1", "slow_retry attempt 2"]
    attempts = client.run(run_id).steps[0].attempts
    assert [(a.number, a.status) for a in attempts] == [(1, "FAILED"), (2, "SUCCEEDED")]


@keel.task(name="eng_interrupts")
def interrupts(i: int) -> int:
    import os
    import signal

    _log(f"interrupts {i}")
    if i == 0 and not _gate("interrupted-once").is_set():
        _gate("interrupted-once").set()
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to the main thread
        # Stay running a moment, so the interrupt lands while the run is busy.
        _gate("never-opened").wait(1.0)
    return i


@keel.workflow(name="eng_ctrl_c", max_concurrency=1)
def ctrl_c(n: int) -> list[int]:
    first = interrupts.submit(0)
    rest = [interrupts.submit(i) for i in range(1, n)]
    return keel.gather(first, rest)


def test_ctrl_c_cancels_the_run_and_it_can_be_resumed(backend: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(KeyboardInterrupt):
        keel.run(ctrl_c, n=4)
    (run,) = keel.Client().runs(workflow="eng_ctrl_c")
    assert run.status == "CANCELLED"
    ran_before = [e for e in _events if e.startswith("interrupts")]
    assert ran_before == ["interrupts 0"]  # the queued steps were not started
    recorded = {s.key for s in run.steps if s.status == "SUCCEEDED"}
    assert "eng_interrupts-0" in recorded

    assert keel.resume(run.id).result() == [0, 1, 2, 3]
    ran = [e for e in _events if e.startswith("interrupts")]
    # Steps recorded as succeeded before the interrupt did not run again.
    again = ran[len(ran_before) :]
    assert not any(f"eng_interrupts-{e.split()[1]}" in recorded for e in again)
    assert sorted(int(e.split()[1]) for e in ran) == [0, 1, 2, 3]


@keel.workflow(name="eng_cancel_deps", max_concurrency=1)
def cancel_deps() -> list[int]:
    first = cancellable.submit(0)
    queued = cancellable.submit(1)  # admitted after the first: cancelled while queued
    waiting = add.submit(queued, 1)  # waits on a cancelled step
    chained = add.submit(waiting, 1)
    keel.wait([queued, waiting, chained], timeout=WAIT)
    _gate("cancel-release").set()
    return keel.gather(first, queued, waiting, chained)


def test_cancel_ends_steps_waiting_on_cancelled_steps(backend: str) -> None:
    _ran.clear()
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("h", keel.run(cancel_deps)))
    runner.start()
    assert _gate("first-started").wait(WAIT)
    (running,) = keel.Client().runs(workflow="eng_cancel_deps")
    keel.cancel(running.id)
    runner.join(WAIT)
    assert not runner.is_alive()
    run = keel.Client().run(running.id)
    assert run.status == "CANCELLED"
    assert _ran == [0]
    # The dependents are not SKIPPED (nothing failed): they are simply not recorded as done.
    assert [(s.key, s.status) for s in run.steps if s.status != "PENDING"] == [
        ("eng_cancellable-0", "SUCCEEDED")
    ]
    assert keel.resume(running.id).result() == [0, 10, 11, 12]
    assert sorted(_ran) == [0, 1]


def test_an_executor_that_cannot_start_fails_the_run(backend: str) -> None:
    from keel.executors import register_executor

    def broken_factory(max_workers: int) -> Any:
        raise RuntimeError("this executor cannot start here")

    register_executor("eng-broken", broken_factory)

    @keel.task(name="eng_on_broken", executor="eng-broken")
    def on_broken() -> int:
        return 1

    @keel.workflow(name="eng_broken_executor")
    def wf() -> int:
        return inc(1) + on_broken()

    run = _run(wf)
    assert run.status == "FAILED"
    assert "this executor cannot start here" in (run.error_message or "")
    assert run.step("eng_inc-0").status == "SUCCEEDED"
    assert run.step("eng_on_broken-1").status == "FAILED"


# -- long chains ------------------------------------------------------------------------------


@keel.task(name="eng_fail_late")
def fail_late(gate: str) -> int:
    if not _gate(gate).wait(WAIT):
        raise TimeoutError("gate never opened")
    raise ValueError("the head of the chain failed")


def test_long_chain_succeeds(backend: str) -> None:
    @keel.workflow(name="eng_long_chain")
    def wf(n: int) -> int:
        x = inc.submit(0)
        for _ in range(n):
            x = add.submit(x, 1)
        return x.result()

    run = _run(wf, n=1500)
    assert run.result() == 1501
    assert len(run.steps) == 1501


@pytest.mark.timeout(15)  # the engine once hung here; it needs well under 1 s
def test_failure_at_the_head_of_a_long_waiting_chain() -> None:
    @keel.workflow(name="eng_long_fail_chain")
    def wf(n: int) -> int:
        x = fail_late.submit("chain-head")
        for _ in range(n):
            x = add.submit(x, 1)  # all waiting on the head when it fails
        _gate("chain-head").set()
        return x.result()

    run = _run(wf, n=1500)
    assert run.status == "FAILED"
    assert run.steps[0].status == "FAILED"
    assert [s.status for s in run.steps[1:]] == ["SKIPPED"] * 1500
    assert "eng_fail_late-0" in (run.steps[-1].error_message or "")
