"""The read API for past runs: `keel.Client().runs(...)`, `.run(id)`, runs, steps and
attempts."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

import keel
from keel.errors import RunFailedError, RunNotFoundError, StepNotFoundError
from keel.store.config import StoreConfig


@keel.task(name="client_square")
def square(x: int) -> int:
    return x * x


@keel.task(name="client_fail")
def fail(x: int) -> int:
    raise KeyError(f"no {x}")


@keel.workflow(name="client_ok", tags={"team": "ml", "stage": "dev"})
def ok(n: int, label: str = "L") -> dict[str, Any]:
    return {"label": label, "squares": keel.gather(square.map(range(n)))}


@keel.workflow(name="client_bad")
def bad(x: int) -> int:
    return fail(square(x))


def test_runs_are_listed_newest_first_with_filters(backend: str) -> None:
    a = keel.run(ok, n=1).id
    b = keel.run(bad, x=1).id
    c = keel.run(ok, n=2).id
    client = keel.Client()
    assert [r.id for r in client.runs()] == [c, b, a]
    assert [r.id for r in client.runs(workflow="client_ok")] == [c, a]
    assert [r.id for r in client.runs(status="FAILED")] == [b]
    assert [r.id for r in client.runs(status="succeeded")] == [c, a]
    assert [r.id for r in client.runs(status=["FAILED", "SUCCEEDED"])] == [c, b, a]
    assert [r.id for r in client.runs(workflow="client_bad", status="SUCCEEDED")] == []
    assert [r.id for r in client.runs(limit=2)] == [c, b]
    assert client.runs(workflow="client_nothing") == []


def test_run_fields(backend: str) -> None:
    handle = keel.run(ok, n=3)
    run = keel.Client().run(handle.id)
    assert run.id == handle.id
    assert run.workflow == "client_ok"
    assert run.status == "SUCCEEDED"
    assert run.params == {"n": 3, "label": "L"}  # defaults are recorded too
    assert run.tags == {"team": "ml", "stage": "dev"}
    assert isinstance(run.started_at, dt.datetime) and run.started_at.tzinfo is not None
    assert isinstance(run.ended_at, dt.datetime)
    assert run.started_at <= run.ended_at
    assert run.duration is not None and run.duration >= 0
    assert run.parent_id is None and run.retry_of is None
    assert run.entrypoint is not None and run.entrypoint.endswith(":ok")
    assert run.result() == {"label": "L", "squares": [0, 1, 4]}
    assert run.id in repr(run)


def test_step_fields(backend: str) -> None:
    run = keel.Client().run(keel.run(ok, n=2).id)
    assert [s.key for s in run.steps] == ["client_square-0", "client_square-1"]
    step = run.steps[1]
    assert step.key == "client_square-1"
    assert step.seq == 1
    assert step.task == "client_square"
    assert step.kind == "task"
    assert step.status == "SUCCEEDED"
    assert step.output() == 1
    assert step.has_output()
    assert step.duration is not None and step.duration >= 0
    assert step.run_id == run.id
    (attempt,) = step.attempts
    assert attempt.number == 1
    assert attempt.status == "SUCCEEDED"
    assert attempt.run_id == run.id and attempt.seq == 1
    assert isinstance(attempt.started_at, dt.datetime)
    assert attempt.logs() == ""
    assert "client_square-1" in repr(step)


def test_step_lookup(backend: str) -> None:
    run = keel.Client().run(keel.run(bad, x=2).id)
    assert run.step("client_square-0").key == "client_square-0"
    assert run.step(1).key == "client_fail-1"
    assert run.step("1").key == "client_fail-1"
    assert run.step("client_fail").key == "client_fail-1"  # a task name that ran once

    many = keel.Client().run(keel.run(ok, n=3).id)
    with pytest.raises(StepNotFoundError, match="ran as 3 steps") as info:
        many.step("client_square")
    assert "client_square-0" in str(info.value)
    with pytest.raises(StepNotFoundError, match="has no step 'nope'"):
        many.step("nope")


def test_failed_run_and_step(backend: str) -> None:
    run = keel.Client().run(keel.run(bad, x=3).id)
    assert run.status == "FAILED"
    assert run.error_type == "KeyError"
    assert "no 9" in (run.error_message or "")
    with pytest.raises(RunFailedError) as info:
        run.result()
    assert info.value.run_id == run.id
    assert info.value.error_type == "KeyError"
    assert info.value.traceback is not None and "KeyError" in info.value.traceback
    assert f"fix the code, then `keel retry {run.id}`" in str(info.value)  # a code bug

    failed = run.step("client_fail-1")
    assert failed.status == "FAILED"
    assert not failed.has_output()
    with pytest.raises(StepNotFoundError, match="no recorded output"):
        failed.output()
    (attempt,) = failed.attempts
    assert attempt.error_type == "KeyError"
    assert attempt.traceback is not None and "KeyError" in attempt.traceback


def test_client_with_an_explicit_database_url(backend: str) -> None:
    handle = keel.run(ok, n=1)
    url = StoreConfig.from_env().db_url
    client = keel.Client(url)
    assert client.run(handle.id).result() == {"label": "L", "squares": [0]}


def test_unknown_run(backend: str) -> None:
    keel.run(ok, n=1)
    with pytest.raises(RunNotFoundError, match="no run with id 'missing-run'"):
        keel.Client().run("missing-run")


@keel.task(
    name="client_configured",
    retries=2,
    timeout=30.0,
    tags={"kind": "fit"},
    resources={"cpus": 2, "memory": 2**30, "accelerator": 1},
)
def configured(x: int) -> int:
    return x


def test_task_options_and_resources_are_recorded_with_the_run(backend: str) -> None:
    @keel.workflow(name="client_configured_wf")
    def wf() -> int:
        return configured(1) + square(2)

    run = keel.Client().run(keel.run(wf).id)
    assert run.result() == 5
    options = run.tasks["client_configured"]
    assert options["retries"] == 2
    assert options["timeout"] == 30.0
    assert options["tags"] == {"kind": "fit"}
    assert options["resources"] == {"cpus": 2, "memory": 2**30, "accelerator": 1}
    assert options["code_hash"] == configured.code_hash
    assert set(run.tasks) == {"client_configured", "client_square"}
