"""Bad input gets a clear error and never loses or alters recorded data.

Each test first records a good run, then feeds one kind of bad input, checks the
error, and checks that the good run's records are exactly as they were."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import keel
from keel.errors import (
    ConfigError,
    DefinitionError,
    ParameterError,
    RunFailedError,
    RunNotFoundError,
    StoreUnavailableError,
)
from keel.sdk.loader import load_workflow
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store

# -- a good run, recorded before every bad input ---------------------------------------


@keel.task(name="bad_square")
def square(x: int) -> int:
    return x * x


@keel.workflow(name="bad_good")
def good(n: int) -> int:
    return sum(keel.gather(square.map(range(n))))


Snapshot = dict[str, Any]


def _snapshot(store: MetadataStore, run_id: str) -> Snapshot:
    run = store.get_run(run_id)
    assert run is not None
    return {
        "run": dict(run._mapping),
        "steps": [dict(r._mapping) for r in store.load_steps(run_id)],
        "attempts": [dict(r._mapping) for r in store.load_attempts(run_id)],
        "logs": [dict(r._mapping) for r in store.load_logs(run_id)],
    }


@pytest.fixture
def recorded(backend: str) -> Iterator[Callable[[], None]]:
    """Records a good run; yields a check that it is unchanged (called by each test)."""
    handle = keel.run(good, n=4)
    assert handle.result() == 14
    store = open_store()
    before = _snapshot(store, handle.id)
    checked = []

    def unchanged() -> None:
        checked.append(True)
        assert _snapshot(open_store(), handle.id) == before
        assert keel.Client().run(handle.id).result() == 14

    yield unchanged
    assert checked, "the test must check the earlier run"


# -- unknown file or workflow name -------------------------------------------------------


def test_unknown_file(recorded: Callable[[], None], tmp_path: Path) -> None:
    with pytest.raises(DefinitionError) as info:
        load_workflow(f"{tmp_path}/nope.py:wf")
    assert "no such file" in str(info.value)
    assert "nope.py" in str(info.value)
    recorded()


def test_unknown_workflow_name_in_a_file(recorded: Callable[[], None], tmp_path: Path) -> None:
    path = tmp_path / "flows_here.py"
    path.write_text(
        "import keel\n\n"
        "@keel.task(name='bad_file_task')\n"
        "def helper(x: int) -> int:\n    return x\n\n"
        "@keel.workflow(name='bad_file_alpha')\n"
        "def alpha() -> int:\n    return helper(1)\n\n"
        "@keel.workflow(name='bad_file_beta')\n"
        "def beta() -> int:\n    return 2\n\n"
        "NOT_A_WORKFLOW = 3\n"
    )
    with pytest.raises(DefinitionError) as info:
        load_workflow(f"{path}:gamma")
    text = str(info.value)
    assert "'gamma'" in text and "does not exist" in text
    assert "alpha" in text and "beta" in text  # says what is there

    with pytest.raises(DefinitionError, match="is not a workflow"):
        load_workflow(f"{path}:NOT_A_WORKFLOW")
    with pytest.raises(DefinitionError, match="is not a workflow"):
        load_workflow(f"{path}:helper")

    wf = load_workflow(f"{path}:alpha")
    assert wf.name == "bad_file_alpha"
    assert keel.run(wf).result() == 1
    recorded()


def test_unknown_module_and_malformed_reference(recorded: Callable[[], None]) -> None:
    with pytest.raises(DefinitionError, match="cannot import module 'no_such_module_xyz'"):
        load_workflow("no_such_module_xyz:wf")
    with pytest.raises(DefinitionError, match="does not name a workflow"):
        load_workflow("just_a_name")
    with pytest.raises(DefinitionError, match="does not name a workflow"):
        load_workflow("module:")
    with pytest.raises(DefinitionError, match="does not exist"):
        load_workflow("keel:no_such_workflow")
    recorded()


# -- bad or missing parameters -------------------------------------------------------------


def test_bad_and_missing_parameters(recorded: Callable[[], None]) -> None:
    with pytest.raises(ParameterError, match="'n' of workflow bad_good expects int, got 'four'"):
        keel.run(good, n="four")
    with pytest.raises(ParameterError, match="needs parameter 'n'"):
        keel.run(good)
    with pytest.raises(ParameterError, match="no parameter 'm'"):
        keel.run(good, n=1, m=2)
    # No run was recorded for any of them.
    assert len(keel.Client().runs()) == 1
    recorded()


# -- a task that raises ------------------------------------------------------------------------


@keel.task(name="bad_raises")
def raises(x: int) -> int:
    raise ZeroDivisionError(f"cannot divide {x} by zero")


def test_task_that_raises(recorded: Callable[[], None]) -> None:
    @keel.workflow(name="bad_raising")
    def raising() -> int:
        return raises(square(2))

    handle = keel.run(raising)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "ZeroDivisionError"
    assert run.traceback is not None and "cannot divide 4 by zero" in run.traceback
    (attempt,) = run.step("bad_raises-1").attempts
    assert attempt.traceback is not None
    assert "ZeroDivisionError: cannot divide 4 by zero" in attempt.traceback
    assert run.step("bad_square-0").output() == 4  # the step before it is kept
    with pytest.raises(RunFailedError):
        handle.result()
    recorded()


# -- outputs that cannot be serialized ------------------------------------------------------------


@keel.task(name="bad_lock")
def make_lock() -> Any:
    return threading.Lock()


@keel.task(name="bad_generator")
def make_generator(n: int) -> Any:
    return (i for i in range(n))


@keel.workflow(name="bad_unserializable")
def unserializable(kind: str) -> Any:
    if kind == "lock":
        return make_lock()
    if kind == "generator":
        return make_generator(3)
    if kind == "result":
        return threading.Lock()  # the workflow's own result
    raise AssertionError(kind)


@pytest.mark.parametrize("executor", ["threads", "processes"])
@pytest.mark.parametrize(
    ("kind", "step_key", "type_fragment"),
    [("lock", "bad_lock-0", "lock"), ("generator", "bad_generator-0", "generator")],
)
def test_output_that_cannot_be_serialized(
    recorded: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    executor: str,
    kind: str,
    step_key: str,
    type_fragment: str,
) -> None:
    monkeypatch.setenv("KEEL_EXECUTOR", executor)
    handle = keel.run(unserializable, kind=kind)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.SerializationError"
    message = run.error_message or ""
    assert f"output of step {step_key}" in message
    assert type_fragment in message.lower()
    step = run.step(step_key)
    assert step.status == "FAILED"
    assert step.error_type == "keel.errors.SerializationError"
    assert not step.has_output()
    recorded()


def test_workflow_result_that_cannot_be_serialized(recorded: Callable[[], None]) -> None:
    handle = keel.run(unserializable, kind="result")
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.SerializationError"
    assert "result of workflow bad_unserializable" in (run.error_message or "")
    assert "lock" in (run.error_message or "").lower()
    recorded()


@keel.task(name="bad_cached", cache=True)
def cached_step(thing: Any, label: str) -> str:
    return label


def test_cached_task_input_that_cannot_be_hashed(recorded: Callable[[], None]) -> None:
    @keel.workflow(name="bad_cached_input")
    def wf() -> str:
        return cached_step(threading.Lock(), label="x")

    run = keel.Client().run(keel.run(wf).id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.SerializationError"
    message = run.error_message or ""
    assert "input arg0 of cached task bad_cached" in message
    assert "lock" in message.lower()
    assert run.step("bad_cached-0").status == "FAILED"
    recorded()


# -- futures from another run --------------------------------------------------------------------

_kept: list[keel.StepFuture[int]] = []


@keel.workflow(name="bad_keeps_future")
def keeps_future() -> int:
    fut = square.submit(3)
    _kept.append(fut)
    return fut.result()


@keel.workflow(name="bad_uses_future")
def uses_future() -> int:
    return square(_kept[-1])


def test_future_from_another_run(recorded: Callable[[], None]) -> None:
    _kept.clear()
    first = keel.run(keeps_future)
    assert first.result() == 9
    first_before = _snapshot(open_store(), first.id)

    handle = keel.run(uses_future)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.ForeignFutureError"
    message = run.error_message or ""
    assert "bad_square-0" in message and first.id in message
    assert run.steps == []  # nothing was started with the foreign value
    assert _snapshot(open_store(), first.id) == first_before
    recorded()


def test_future_made_outside_any_run(recorded: Callable[[], None]) -> None:
    _kept.clear()
    _kept.append(square.submit(5))  # a finished future of no run
    handle = keel.run(uses_future)
    run = keel.Client().run(handle.id)
    assert run.status == "FAILED"
    assert run.error_type == "keel.errors.ForeignFutureError"
    recorded()


# -- bad database URLs --------------------------------------------------------------------------


def _open(url: str) -> MetadataStore:
    return MetadataStore(StoreConfig.from_env(db_url=url))


def test_corrupt_sqlite_file(recorded: Callable[[], None], tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    garbage = b"this is not a database, " * 200
    corrupt.write_bytes(garbage)
    with pytest.raises(StoreUnavailableError) as info:
        _open(f"sqlite:///{corrupt}")
    text = str(info.value)
    assert "cannot open the metadata store" in text
    assert "corrupt.db" in text
    assert "not a database" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert corrupt.read_bytes() == garbage  # left exactly as it was
    recorded()


def test_corrupt_database_through_the_public_api(
    recorded: Callable[[], None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"\x00garbage" * 500)
    with monkeypatch.context() as env:
        env.setenv("KEEL_DB_URL", f"sqlite:///{corrupt}")
        with pytest.raises(StoreUnavailableError, match="cannot open the metadata store"):
            keel.run(good, n=1)
        with pytest.raises(StoreUnavailableError):
            keel.Client()
    recorded()


def test_unreachable_postgres(recorded: Callable[[], None]) -> None:
    with pytest.raises(StoreUnavailableError) as info:
        _open("postgresql+psycopg://keel:secret@127.0.0.1:1/nowhere")
    text = str(info.value)
    assert "cannot open the metadata store" in text
    assert "127.0.0.1:1" in text
    assert "secret" not in text  # the password is not shown
    assert "KEEL_DB_URL" in text
    recorded()


def test_sqlite_path_that_cannot_be_a_database(
    recorded: Callable[[], None], tmp_path: Path
) -> None:
    folder = tmp_path / "a-folder.db"
    folder.mkdir()
    with pytest.raises(StoreUnavailableError, match="cannot open the metadata store"):
        _open(f"sqlite:///{folder}")
    recorded()


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("not a url at all", "not a valid SQLAlchemy URL"),
        ("nosuchdb://user@host/db", "cannot use the database URL"),
    ],
)
def test_malformed_database_url(recorded: Callable[[], None], url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        _open(url)
    assert "KEEL_DB_URL" in str(info.value) or "Supported" in str(info.value)
    recorded()


def test_bad_inline_limit(recorded: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as env:
        env.setenv("KEEL_INLINE_LIMIT", "lots")
        with pytest.raises(ConfigError, match="KEEL_INLINE_LIMIT must be a whole number"):
            StoreConfig.from_env()
        with pytest.raises(ConfigError, match="KEEL_INLINE_LIMIT"):
            keel.run(good, n=1)
    recorded()


def test_unknown_artifact_store_scheme(
    recorded: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as env:
        env.setenv("KEEL_ARTIFACTS", "nosuchscheme://bucket/keel")
        env.setenv("KEEL_INLINE_LIMIT", "0")
        handle = keel.run(good, n=2)
        run = keel.Client().run(handle.id)
        assert run.status == "FAILED"
        assert run.error_type == "keel.errors.ConfigError"
        assert "nosuchscheme://bucket/keel" in (run.error_message or "")
    recorded()


# -- unknown run ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["resume", "retry", "cancel"])
def test_unknown_run_id(recorded: Callable[[], None], operation: str) -> None:
    action = getattr(keel, operation)
    with pytest.raises(RunNotFoundError) as info:
        action("does-not-exist")
    assert "no run with id 'does-not-exist'" in str(info.value)
    assert "keel runs ls" in str(info.value)
    assert len(keel.Client().runs()) == 1
    recorded()
