"""Triggers on SQLite and PostgreSQL: on another workflow's end, on a registry alias
move, on a webhook call, on files appearing. Each cause fires once, and each firing
is recorded with its cause and the run it started. No wall-clock time is asserted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import keel
from flows import schedule_flows as flows
from keel.errors import DefinitionError, ParameterError, ScheduleError
from keel.scheduler.scheduler import Scheduler
from keel.scheduler.worker import Worker
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store

pytestmark = pytest.mark.timeout(300)

TESTS = Path(__file__).resolve().parent
WAIT = 120.0


def scheduler(store: MetadataStore | None = None) -> Scheduler:
    return Scheduler(store, trigger_interval=0, sync_declared=False)


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run_to_end(run_ids: list[str]) -> None:
    """Execute queued runs with a worker on a thread of the test."""
    worker = Worker(poll_seconds=0.05, grace_seconds=5)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    store = open_store()
    try:
        wait_until(
            "the triggered runs to end",
            lambda: all(store.get_run(r).status in ("SUCCEEDED", "FAILED") for r in run_ids),
        )
    finally:
        worker.stop()
        thread.join(60)


def result_of(run_id: str) -> Any:
    return keel.Client().run(run_id).result()


# -- on another workflow's end -------------------------------------------------------------
def test_a_run_trigger_fires_once_per_ended_run(backend: str) -> None:
    before = keel.run(flows.upstream)  # ended before the trigger existed: not a cause
    keel.triggers.add("after", flows.after_run, on_run="trig_upstream", params={"note": "n"})
    keel.triggers.add("after-failure", flows.after_run, on_run="trig_upstream", statuses=["FAILED"])
    ok = keel.run(flows.upstream)
    bad = keel.run(flows.upstream, fail=True)
    assert (ok.status, bad.status) == ("SUCCEEDED", "FAILED")
    sched = scheduler()
    fired = sched.tick().fired
    assert len(fired) == 2
    events = {e.trigger: e for e in keel.triggers.events()}
    assert events["after"].cause == {
        "kind": "run",
        "run_id": ok.id,
        "status": "SUCCEEDED",
        "workflow": "trig_upstream",
    }
    assert events["after-failure"].cause["run_id"] == bad.id
    assert {e.run_id for e in events.values()} == set(fired)
    assert before.id not in {e.cause["run_id"] for e in events.values()}
    # The same ends do not fire again; a new end fires once more.
    assert sched.tick().fired == []
    again = keel.run(flows.upstream)
    (third,) = scheduler().tick().fired
    assert keel.triggers.events("after")[0].cause["run_id"] == again.id
    run_to_end([*fired, third])
    row = open_store().get_run(events["after"].run_id)
    assert (row.status, row.trigger_name) == ("SUCCEEDED", "after")
    assert result_of(events["after"].run_id) == f"{ok.id} SUCCEEDED n"
    assert result_of(events["after-failure"].run_id) == f"{bad.id} FAILED"
    assert len(keel.triggers.events("after")) == 2


def test_racing_schedulers_fire_a_run_trigger_once_per_cause(backend: str) -> None:
    keel.triggers.add("after", flows.after_run, on_run="trig_upstream")
    stores = [MetadataStore(StoreConfig.from_env()) for _ in range(3)]
    stop = threading.Event()
    fired: list[str] = []
    errors: list[dict[str, str]] = []

    def loop(store: MetadataStore) -> None:
        sched = scheduler(store)
        while not stop.is_set():
            result = sched.tick()
            fired.extend(result.fired)
            if result.errors:
                errors.append(result.errors)

    threads = [threading.Thread(target=loop, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    try:
        ended = [keel.run(flows.upstream).id for _ in range(8)]
        wait_until("every end to fire", lambda: len(keel.triggers.events("after")) >= 8)
        time.sleep(0.3)  # a little longer: any second firing would show up now
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        for s in stores:
            s.dispose()
    assert not errors
    causes = Counter(e.cause["run_id"] for e in keel.triggers.events("after"))
    assert causes == Counter(ended)
    assert len(fired) == 8


# -- on an alias move --------------------------------------------------------------------------
def test_an_alias_trigger_fires_on_each_move(backend: str) -> None:
    for _ in range(3):
        keel.register_model("scorer", flows.Doubler())
    keel.triggers.add("promoted", flows.after_alias, on_alias="scorer@champion")
    keel.triggers.add("any-alias", flows.after_alias, on_alias="scorer")
    sched = scheduler()
    keel.models.set_alias("scorer", "champion", 1)
    keel.models.set_alias("scorer", "champion", 1)  # set again, same version: not a move
    keel.models.set_alias("scorer", "staging", 3)
    fired = sched.tick().fired
    assert len(fired) == 3  # champion -> 1 (both triggers), staging -> 3 (any-alias)
    keel.models.set_alias("scorer", "champion", 2)
    assert len(sched.tick().fired) == 2
    assert sched.tick().fired == []
    promoted = keel.triggers.events("promoted")
    assert [
        (e.cause["alias"], e.cause["version"], e.cause["previous_version"]) for e in promoted
    ] == [
        ("champion", 2, 1),
        ("champion", 1, None),
    ]
    assert promoted[0].cause["kind"] == "alias" and promoted[0].cause["model"] == "scorer"
    assert len(keel.triggers.events("any-alias")) == 3
    run_to_end([e.run_id for e in promoted if e.run_id])
    assert result_of(promoted[0].run_id) == "scorer@champion=2"


# -- on a webhook ------------------------------------------------------------------------------
def test_a_webhook_passes_its_payload_as_parameters(backend: str) -> None:
    info = keel.triggers.add("hook", flows.hook, webhook=True, params={"label": "L"})
    token = info.config["token"]
    assert len(token) >= 24
    handle = keel.fire_trigger("hook", {"n": 3}, token=token)
    (event,) = keel.triggers.events("hook")
    assert event.cause == {"kind": "webhook", "payload": {"n": 3}}
    assert event.run_id == handle.id
    row = open_store().get_run(handle.id)
    assert (row.status, row.trigger_name, row.queue) == ("PENDING", "hook", "default")
    # The payload is the caller's input: checked against the workflow, nothing recorded
    # when it is wrong.
    for payload, message in [
        ({"n": "three"}, "parameter 'n' of workflow trig_hook expects int"),
        ({"n": 1, "colour": "red"}, "has no parameter 'colour'"),
        ({}, "needs parameter 'n'"),
        (["n", 1], "must be a JSON object of parameters"),
    ]:
        with pytest.raises(ParameterError, match=message):
            keel.fire_trigger("hook", payload)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError, match="wrong token"):
        keel.fire_trigger("hook", {"n": 1}, token="guess")
    with pytest.raises(ScheduleError, match="no trigger named 'hoook'") as caught:
        keel.fire_trigger("hoook", {"n": 1})
    assert caught.value.hint == "Did you mean hook?"
    assert len(keel.triggers.events("hook")) == 1
    run_to_end([handle.id])
    assert result_of(handle.id) == "L:3"
    # A webhook is fired by callers, never by the scheduler.
    assert scheduler().tick().fired == []


# -- on files -------------------------------------------------------------------------------
def test_a_file_sensor_fires_once_per_new_file(backend: str, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "old.csv").write_text("old\n")
    keel.triggers.add("landing", flows.on_file, on_files=f"{inbox}/*.csv", poll_seconds=0)
    keel.triggers.add(
        "landing-new",
        flows.on_file,
        on_files=f"{inbox}/*.csv",
        poll_seconds=0,
        ignore_existing=True,
    )
    sched = scheduler()
    fired = sched.tick().fired
    assert len(fired) == 1  # old.csv, for the trigger that takes existing files
    (inbox / "a.csv").write_text("a\n")
    (inbox / "notes.txt").write_text("not matching\n")
    (inbox / "sub.csv").mkdir()  # a folder, not a file
    fired += sched.tick().fired
    assert len(fired) == 3  # a.csv, for both
    assert sched.tick().fired == []
    paths = sorted(e.cause["path"] for e in keel.triggers.events("landing"))
    assert paths == [str(inbox / "a.csv"), str(inbox / "old.csv")]
    assert [e.cause["path"] for e in keel.triggers.events("landing-new")] == [str(inbox / "a.csv")]
    run_to_end(fired)
    results = sorted(result_of(r) for r in fired)
    assert results == ["a", "a", "old"]


def test_a_file_sensor_on_an_fsspec_url(backend: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/keel-test-landing/x.json", b"{}")
    try:
        keel.triggers.add(
            "mem", flows.plain, on_files="memory://keel-test-landing/*.json", poll_seconds=0
        )
        (run_id,) = scheduler().tick().fired
        (event,) = keel.triggers.events("mem")
        assert event.cause == {"kind": "file", "path": "memory:///keel-test-landing/x.json"}
        assert event.run_id == run_id
    finally:
        fs.rm("/keel-test-landing", recursive=True)


def test_a_sensor_is_listed_at_its_interval(backend: str, tmp_path: Path) -> None:
    keel.triggers.add("slow", flows.on_file, on_files=f"{tmp_path}/*.csv", poll_seconds=3600)
    sched = scheduler()
    assert sched.tick().fired == []  # listed now: nothing there yet
    (tmp_path / "late.csv").write_text("late\n")
    assert sched.tick().fired == []  # not listed again before an hour has passed
    assert len(scheduler().tick().fired) == 1  # (a fresh scheduler lists at once)


# -- bad input ---------------------------------------------------------------------------------
def test_bad_triggers_are_clear_errors(backend: str, tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({}, ScheduleError, "give exactly one of on_run, on_alias, webhook, on_files"),
        ({"on_run": "trig_upstream", "webhook": True}, ScheduleError, "got run, webhook"),
        ({"on_run": "trig_after_run"}, ScheduleError, "an endless loop"),
        ({"on_run": "trig_upstream", "statuses": ["DONE"]}, ScheduleError, "bad statuses"),
        ({"on_alias": "@champion"}, ScheduleError, "names no model"),
        ({"on_files": "nosuchproto://bucket/*.csv"}, ScheduleError, "cannot list"),
        ({"webhook": True, "params": {"colour": 1}}, ParameterError, "no parameter 'colour'"),
        ({"on_run": "trig_upstream", "params": {"note": 5}}, ParameterError, "expects str"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            keel.triggers.add("t", flows.after_run, **options)
    with pytest.raises(ParameterError, match="needs parameter 'n'"):
        keel.triggers.add("t", flows.hook, on_run="trig_upstream")  # nothing offers n
    with pytest.raises(DefinitionError, match="does not exist"):
        keel.triggers.add("t", "flows.schedule_flows:missing", webhook=True)
    with pytest.raises(ScheduleError, match="bad trigger name"):
        keel.triggers.add("a b", flows.hook, webhook=True)
    keel.triggers.add("t", flows.hook, webhook=True)
    with pytest.raises(ScheduleError, match="exists already"):
        keel.triggers.add("t", flows.hook, webhook=True)
    with pytest.raises(ScheduleError, match="no trigger named 'x'"):
        keel.triggers.remove("x")
    assert [t.name for t in keel.triggers.ls()] == ["t"]


# -- the command line --------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (no interpreter start-up), for bad input."""
    from typer.testing import CliRunner

    from keel.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(
        ["keel", *args], result.exit_code, result.stdout, result.stderr
    )


def keel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=TESTS,
    )


def test_cli_triggers(backend: str, tmp_path: Path) -> None:
    hook = keel_cli(
        "triggers", "add", "hook", "flows.schedule_flows:hook", "--webhook", "--param", "label=cli"
    )
    assert hook.returncode == 0, hook.stderr
    assert "token: " in hook.stdout
    added = keel_cli(
        "triggers",
        "add",
        "after",
        "flows.schedule_flows:after_run",
        "--on-run",
        "trig_upstream",
        "--status",
        "failed",
        "--status",
        "succeeded",
    )
    assert added.returncode == 0, added.stderr
    assert "when a run of trig_upstream ends FAILED/SUCCEEDED" in added.stdout
    fired = keel_cli("triggers", "fire", "hook", "--data", '{"n": 4}')
    assert fired.returncode == 0, fired.stderr
    assert "trigger hook fired: queued run" in fired.stdout
    listed = cli("triggers", "ls")
    assert "hook" in listed.stdout and "after" in listed.stdout
    shown = cli("triggers", "events", "hook")
    assert '"payload": {"n": 4}' in shown.stdout
    for args, message in [
        (("triggers", "fire", "hook", "--data", '{"n": "four"}'), "expects int"),
        (("triggers", "fire", "hook", "--data", "{n: 4}"), "--data is not valid JSON"),
        (("triggers", "fire", "hoke"), "no trigger named 'hoke'"),
        (("triggers", "add", "x", "flows.schedule_flows:hook"), "give exactly one of"),
        (("triggers", "rm", "nope"), "no trigger named 'nope'"),
    ]:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert cli("triggers", "rm", "hook").returncode == 0
    assert len(keel.triggers.events("hook")) == 1  # the firing stays recorded
