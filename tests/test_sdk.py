"""The SDK surface: plain calls outside runs, decorator validation, typed workflow
parameters, and `keel.context()`."""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

import pytest
from pydantic import Field

import keel
from keel.errors import DefinitionError, KeelError, ParameterError

# -- tasks used by the tests below ------------------------------------------------------


@keel.task(name="sdk_double")
def double(x: int) -> int:
    return 2 * x


@keel.task(name="sdk_add")
def add(x: int, y: int = 0) -> int:
    return x + y


@keel.task(name="sdk_boom")
def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


@keel.task(name="sdk_async_inc")
async def async_inc(x: int) -> int:
    return x + 1


# -- outside any run, a task is its function ---------------------------------------------


def test_task_called_outside_a_workflow_is_a_plain_call() -> None:
    assert double(21) == 42
    assert add(1, y=2) == 3
    assert async_inc(1) == 2
    with pytest.raises(ValueError, match="boom 3"):
        boom(3)
    # Nothing was recorded: no store was even needed.
    assert keel.Client().runs() == []


def test_submit_outside_a_run_returns_a_finished_future() -> None:
    fut = double.submit(5)
    assert fut.done()
    assert fut.result() == 10
    assert fut.exception() is None

    failed = boom.submit(1)
    assert failed.done()
    assert isinstance(failed.exception(), ValueError)
    with pytest.raises(ValueError, match="boom 1"):
        failed.result()


def test_map_and_gather_outside_a_run() -> None:
    futures = add.map([1, 2, 3], y=10)
    assert all(f.done() for f in futures)
    assert keel.gather(futures) == [11, 12, 13]
    done, not_done = keel.wait(futures)
    assert len(done) == 3 and not_done == []


def test_workflow_called_outside_a_run_is_a_plain_call() -> None:
    @keel.workflow(name="sdk_plain_wf")
    def plain(n: int) -> list[int]:
        return keel.gather(double.map(range(n)))

    assert plain(3) == [0, 2, 4]
    assert keel.Client().runs() == []
    with pytest.raises(DefinitionError, match="outside a workflow"):
        plain.submit(3)


def test_task_keeps_the_function_metadata() -> None:
    assert double.name == "sdk_double"
    assert double.__name__ == "double"
    assert double.__doc__ is None
    assert repr(double) == "<keel.task sdk_double>"

    @keel.task
    def unnamed(x: int) -> int:
        """Docs survive."""
        return x

    assert unnamed.name.endswith("unnamed")
    assert unnamed.__doc__ == "Docs survive."


# -- decorator options are validated ------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"retries": -1}, "retries must be >= 0"),
        ({"retry_delay": -0.5}, "bad retry timing"),
        ({"retry_backoff": 0.5}, "bad retry timing"),
        ({"retry_jitter": 1.5}, "bad retry timing"),
        ({"timeout": 0}, "timeout must be a positive"),
        ({"timeout": -3}, "timeout must be a positive"),
        ({"executor": "gpu-farm"}, "unknown executor 'gpu-farm'"),
        ({"retry_on": ValueError("not a type")}, "retry_on must be exception types"),
        ({"retry_on": (ValueError, int)}, "retry_on must be exception types"),
        ({"retry_on": str}, "retry_on must be exception types"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"resources": {"cpus": 1, "gpus": 1, "memory": 1, "tpu": 2}}, None),
    ],
)
def test_task_options_are_validated(options: dict[str, Any], fragment: str | None) -> None:
    def body(x: int) -> int:
        return x

    if fragment is None:
        # Unknown resource names are kept as custom resources, not rejected.
        t = keel.task(name="sdk_opts_ok", **options)(body)
        assert t.opts.resources.cpus == 1
        assert dict(t.opts.resources.custom) == {"tpu": 2}
        return
    with pytest.raises(DefinitionError, match=fragment) as info:
        keel.task(name="sdk_bad_opts", **options)(body)
    assert "sdk_bad_opts" in str(info.value)


def test_task_options_accepted_and_normalised() -> None:
    @keel.task(
        name="sdk_all_opts",
        retries=2,
        retry_delay=0.5,
        retry_on=KeyError,
        timeout=3.0,
        cache=True,
        cache_version="v2",
        executor="processes",
        tags={"team": "ml"},
        resources=keel.Resources(cpus=2, memory=1024),
        max_concurrency=3,
    )
    def configured(x: int) -> int:
        return x

    opts = configured.opts
    assert opts.retries == 2
    assert opts.retry_on == (KeyError,)
    assert opts.timeout == 3.0
    assert opts.cache and opts.cache_version == "v2"
    assert opts.executor == "processes"
    assert dict(opts.tags) == {"team": "ml"}
    assert opts.resources.cpus == 2 and opts.resources.memory == 1024
    assert opts.max_concurrency == 3

    changed = configured.with_options(retries=5)
    assert changed.opts.retries == 5 and configured.opts.retries == 2
    assert changed.name == configured.name
    with pytest.raises(DefinitionError, match="unknown executor"):
        configured.with_options(executor="nope")


def test_workflow_options_are_validated() -> None:
    def body() -> None:
        return None

    with pytest.raises(DefinitionError, match="unknown executor 'k8s'"):
        keel.workflow(name="sdk_bad_wf_exec", executor="k8s")(body)
    with pytest.raises(DefinitionError, match="max_concurrency must be >= 1"):
        keel.workflow(name="sdk_bad_wf_conc", max_concurrency=0)(body)


# -- typed workflow parameters ---------------------------------------------------------------


@keel.workflow(name="sdk_typed")
def typed(n: int, label: str = "x", ratio: float = 0.5, flags: list[int] | None = None) -> dict:
    return {"n": n, "label": label, "ratio": ratio, "flags": flags, "twice": double(n)}


def test_typed_parameters_are_converted_and_recorded(backend: str) -> None:
    handle = keel.run(typed, n="3", ratio=2, flags=["1", 2])
    assert handle.result() == {"n": 3, "label": "x", "ratio": 2.0, "flags": [1, 2], "twice": 6}
    run = keel.Client().run(handle.id)
    # Defaults are recorded too, so a replay sees them even if the code changes.
    assert run.params == {"n": 3, "label": "x", "ratio": 2.0, "flags": [1, 2]}


def test_bad_parameter_type_names_parameter_type_and_value(backend: str) -> None:
    with pytest.raises(ParameterError) as info:
        keel.run(typed, n="three")
    text = str(info.value)
    assert "'n'" in text
    assert "int" in text
    assert "'three'" in text
    assert "sdk_typed" in text
    assert keel.Client().runs() == []

    with pytest.raises(ParameterError) as info:
        keel.run(typed, n=1, flags=[1, "two"])
    text = str(info.value)
    assert "'flags'" in text and "[1, 'two']" in text


def test_missing_parameter(backend: str) -> None:
    with pytest.raises(ParameterError) as info:
        keel.run(typed)
    text = str(info.value)
    assert "'n'" in text and "int" in text and "not given" in text
    assert keel.Client().runs() == []


def test_unknown_parameter(backend: str) -> None:
    with pytest.raises(ParameterError) as info:
        keel.run(typed, n=1, size=3)
    text = str(info.value)
    assert "'size'" in text
    # The message lists what the workflow does take.
    assert "n: int" in text and "label: str" in text
    assert keel.Client().runs() == []


def test_parameters_must_be_json_data(backend: str) -> None:
    @keel.workflow(name="sdk_any_param")
    def takes_anything(thing: Any) -> str:
        return type(thing).__name__

    with pytest.raises(ParameterError, match="must be JSON data"):
        keel.run(takes_anything, thing=threading.Lock())
    assert keel.Client().runs() == []
    assert keel.run(takes_anything, thing={"a": [1, 2]}).result() == "dict"


def test_var_keyword_workflow_accepts_extra_parameters(backend: str) -> None:
    @keel.workflow(name="sdk_kwargs_wf")
    def open_ended(a: int, **rest: Any) -> dict:
        return {"a": a, **rest}

    assert keel.run(open_ended, a="1", b=2, c="x").result() == {"a": 1, "b": 2, "c": "x"}


# -- keel.context() ---------------------------------------------------------------------------

_context_seen: list[dict[str, Any]] = []


@keel.task(name="sdk_ctx", retries=2, retry_delay=0.0)
def report_context(fail_until: int) -> dict[str, Any]:
    ctx = keel.context()
    _context_seen.append(
        {
            "run_id": ctx.run_id,
            "step_key": ctx.step_key,
            "task": ctx.task,
            "attempt": ctx.attempt,
            "idempotency_key": ctx.idempotency_key,
        }
    )
    ctx.logger.info("hello from attempt %d", ctx.attempt)
    if ctx.attempt < fail_until:
        raise RuntimeError(f"attempt {ctx.attempt} fails")
    return _context_seen[-1]


@keel.workflow(name="sdk_ctx_wf")
def context_flow(fail_until: int = 1) -> dict[str, Any]:
    body = keel.context()
    double(1)
    seen = report_context(fail_until)
    return {"body_run_id": body.run_id, "body_step_key": body.step_key, "step": seen}


def test_context_inside_a_step(backend: str) -> None:
    _context_seen.clear()
    handle = keel.run(context_flow, fail_until=3)
    out = handle.result()
    assert out["body_run_id"] == handle.id
    assert out["body_step_key"] is None
    step = out["step"]
    assert step["run_id"] == handle.id
    assert step["step_key"] == "sdk_ctx-1"
    assert step["task"] == "sdk_ctx"
    assert step["attempt"] == 3
    assert step["idempotency_key"]
    # One entry per attempt; the idempotency key is the same for every attempt.
    assert [s["attempt"] for s in _context_seen] == [1, 2, 3]
    assert {s["idempotency_key"] for s in _context_seen} == {step["idempotency_key"]}
    assert {s["step_key"] for s in _context_seen} == {"sdk_ctx-1"}

    recorded = keel.Client().run(handle.id).step("sdk_ctx-1")
    assert [a.number for a in recorded.attempts] == [1, 2, 3]
    for attempt in recorded.attempts:
        assert f"hello from attempt {attempt.number}" in attempt.logs()


def test_context_outside_a_run_raises() -> None:
    with pytest.raises(KeelError, match="outside any run"):
        keel.context()
    # A plain call of a task is outside any run too.
    with pytest.raises(KeelError, match="outside any run"):
        report_context.fn(0)


def test_context_logger_is_a_logger(backend: str) -> None:
    @keel.task(name="sdk_ctx_logger")
    def logger_name() -> str:
        logger = keel.context().logger
        assert isinstance(logger, logging.Logger)
        return logger.name

    @keel.workflow(name="sdk_ctx_logger_wf")
    def wf() -> str:
        return logger_name()

    assert keel.run(wf).result() == "keel.step.sdk_ctx_logger"


# -- the run handle ----------------------------------------------------------------------------


def test_run_handle(backend: str) -> None:
    @keel.workflow(name="sdk_handle_wf")
    def wf(x: int) -> int:
        return double(x)

    handle = keel.run(wf, x=4)
    assert isinstance(handle.id, str) and handle.id
    assert handle.status == "SUCCEEDED"
    assert handle.workflow == "sdk_handle_wf"
    assert handle.result() == 8
    assert handle.id in repr(handle)


def test_async_task_inside_a_workflow(backend: str) -> None:
    @keel.workflow(name="sdk_async_wf")
    def wf(x: int) -> int:
        return async_inc(async_inc(x))

    assert keel.run(wf, x=1).result() == 3


def test_annotated_constraints_on_parameters_are_checked() -> None:
    @keel.workflow(name="sdk_constrained")
    def constrained(k: Annotated[int, Field(ge=1)] = 5) -> int:
        return k

    assert constrained.validate({"k": "3"}) == {"k": 3}
    assert constrained.validator.describe() == "k: int=5"
    with pytest.raises(ParameterError, match=r"parameter 'k' .* expects int, got 0.*greater than"):
        constrained.validate({"k": 0})
