"""Issue #9, items 5 and 6: bad values never lose a batch, never give a 500.

A value the store cannot hold (a NUL character, which PostgreSQL refuses; a lone
surrogate, which neither driver can encode; a number beyond 64 bits) is refused
where it is given: a tracking call raises InvalidValueError in the step that made
it, an MLflow route answers 400 INVALID_PARAMETER_VALUE naming the field. A row
that still reaches the database and is refused there costs only that row: the
recorder records the rest, and only the step and run it belongs to fail. The same
workflow ends the same way on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import keel
from keel.errors import InvalidValueError, TrackingError
from keel.store.metadata import open_store
from keel.store.recorder import Recorder
from keel.store.tracking import load_metric_history
from keel.tracking.active import current
from server_support import live_server, make_app, stop

NUL_KEY = "bad\x00key"
LONE = "bad\ud800"  # a lone surrogate: not valid Unicode, cannot be encoded as UTF-8


# -- a workflow of 20 good steps and one bad one ------------------------------------------------


@keel.task(name="bv_good")
def good(i: int) -> int:
    keel.log_metric("loss", 1.0 / (i + 1), step=i)
    return i


@keel.task(name="bv_bad_param")
def bad_param() -> int:
    keel.log_param(NUL_KEY, "v")
    return -1


@keel.task(name="bv_sneaks_row")
def sneaks_row() -> int:
    """A row past the checks at the call (as a bug in keel, or a driver refusing what
    the checks allowed, would send): the database itself must refuse it."""
    print("a log line with a NUL \x00 and a lone surrogate \ud800")
    run = current()
    assert run is not None
    run.recorder.param((run.run_id, run.seq, LONE, "v"))
    return -1


@keel.task(name="bv_raises")
def raises() -> int:
    raise ValueError("an error message with a NUL \x00 and a lone surrogate \ud800")


@keel.workflow(name="bv_flow")
def flow(sneak: bool = False) -> dict[str, Any]:
    total = sum(good(i) for i in range(10))
    caught = ""
    try:
        (sneaks_row if sneak else bad_param)()
    except InvalidValueError as exc:
        caught = exc.message
    if sneak:
        try:
            raises()
        except ValueError:
            pass
    total += sum(good(i) for i in range(10, 20))
    return {"total": total, "caught": caught}


def _outcome(run_id: str) -> dict[str, Any]:
    """What a run recorded, with run ids taken out so two stores compare equal."""
    store = open_store()
    run = store.get_run(run_id)
    assert run is not None
    steps = store.load_steps(run_id)
    metrics = [
        len(load_metric_history(store, run_id, s.seq, "loss")) for s in steps if s.task == "bv_good"
    ]

    def plain(text: str | None) -> str | None:
        return text.replace(run_id, "<run>") if text else text

    return {
        "status": run.status,
        "error": plain(run.error_message),
        "steps": [(s.task, s.status, plain(s.error_message)) for s in steps],
        "metric points": metrics,
        "logs": [row.text for row in store.load_logs(run_id)],
    }


def _run_on(url: str | None, monkeypatch: pytest.MonkeyPatch, sneak: bool) -> dict[str, Any]:
    if url is None:
        monkeypatch.delenv("KEEL_DB_URL", raising=False)
    else:
        monkeypatch.setenv("KEEL_DB_URL", url)
    try:
        handle = keel.run(flow, sneak=sneak)
        run_id, result = handle.id, handle.result()
    except keel.RunFailedError as exc:
        assert exc.run_id is not None
        run_id, result = exc.run_id, None
    return {"result": result, **_outcome(run_id)}


def test_a_nul_key_fails_its_step_alone_the_same_on_sqlite_and_postgres(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the fix: on PostgreSQL 0 of 21 steps recorded and the run left RUNNING.
    on_sqlite = _run_on(None, monkeypatch, sneak=False)
    on_postgres = _run_on(pg_url, monkeypatch, sneak=False)
    assert on_sqlite == on_postgres
    message = "param key 'bad\\x00key' has a NUL character ('\\x00') at position 3"
    assert on_postgres["status"] == "SUCCEEDED"
    assert on_postgres["result"] == {"total": sum(range(20)), "caught": message}
    statuses = [status for _, status, _ in on_postgres["steps"]]
    assert len(statuses) == 21
    assert statuses.count("SUCCEEDED") == 20
    assert on_postgres["steps"][10] == ("bv_bad_param", "FAILED", message)
    assert on_postgres["metric points"] == [1] * 20


def test_a_row_the_database_refuses_costs_only_its_step_and_run(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the fix the whole batch was lost with it, the run stayed RUNNING, and the
    # error blamed the database and disk space.
    on_sqlite = _run_on(None, monkeypatch, sneak=True)
    on_postgres = _run_on(pg_url, monkeypatch, sneak=True)
    assert on_sqlite == on_postgres
    refused = (
        "the metadata store refused param 'bad\\ud800' of step 10, so it is not recorded: "
        "it has a lone surrogate ('\\ud800') at position 3, which is not valid Unicode"
    )
    assert on_postgres["status"] == "FAILED"
    assert on_postgres["error"] == refused
    assert "disk" not in refused
    statuses = [status for _, status, _ in on_postgres["steps"]]
    assert len(statuses) == 22 and statuses.count("SUCCEEDED") == 20
    assert on_postgres["steps"][10] == ("bv_sneaks_row", "FAILED", refused)
    # An exception's message is kept, escaped alike on both databases.
    escaped = "an error message with a NUL \\x00 and a lone surrogate \\ud800"
    assert on_postgres["steps"][11] == ("bv_raises", "FAILED", escaped)
    assert on_postgres["metric points"] == [1] * 20
    # The log line is kept, its NUL and surrogate escaped alike on both databases.
    assert on_postgres["logs"] == ["a log line with a NUL \\x00 and a lone surrogate \\ud800\n"]


def test_the_recorder_finds_the_refused_rows_among_many(backend: str) -> None:
    store = open_store()
    recorder = Recorder(store)
    good_rows = [("r1", 0, f"m{i}", float(i), False, i, 1.0) for i in range(200)]
    bad_metric = ("r1", 3, LONE, 1.0, False, 0, 1.0)
    for row in [*good_rows[:97], bad_metric, *good_rows[97:]]:
        recorder.metric(row)
    recorder.param(("r1", 0, "fine", "1"))
    recorder.tag(("r2", -1, "team", LONE))
    recorder.flush()
    with store.engine.connect() as conn:
        points = conn.exec_driver_sql("SELECT count(*) FROM keel_metrics").scalar()
        params = conn.exec_driver_sql("SELECT key, value FROM keel_params").all()
    assert points == 200
    assert [tuple(p) for p in params] == [("fine", "1")]
    refused = recorder.take_refused("r1")
    assert [(r.seq, r.what) for r in refused] == [(3, "metric 'bad\\ud800'")]
    assert [r.what for r in recorder.take_refused("r2")] == ["tag 'team'"]
    assert recorder.take_refused("r1") == []  # taken once
    assert recorder.error is None  # nothing blamed on the database


@keel.task(name="bv_sneaks_away", executor="processes")
def sneaks_away() -> int:
    keel.log_metric("kept", 1.0)
    run = current()
    assert run is not None
    run.recorder.param((run.run_id, run.seq, LONE, "v"))  # past the checks
    return 1


@keel.workflow(name="bv_away")
def away() -> str:
    try:
        sneaks_away()
    except InvalidValueError as exc:
        return exc.message
    return "not refused"


def test_a_step_in_another_process_fails_at_its_flush(backend: str) -> None:
    handle = keel.run(away)
    message = handle.result()
    assert message.startswith("the metadata store refused param 'bad\\ud800' of step 0")
    step = keel.Client().run(handle.id).step(0)
    assert (step.status, step.data.metrics) == ("FAILED", {"kept": 1.0})


def test_a_tracked_run_with_a_refused_row_ends_failed(backend: str) -> None:
    run = keel.start_run(experiment="bv")
    keel.log_metric("kept", 1.0)
    tracked = current()
    assert tracked is not None
    tracked.recorder.tag((tracked.run_id, -1, "team", LONE))  # past the checks
    with pytest.raises(InvalidValueError, match=r"refused tag 'team' of the run"):
        run.end()
    read = keel.Client().run(run.id)
    assert read.status == "FAILED"
    assert read.data.metrics == {"kept": 1.0} and read.data.tags == {}


# -- checks at the call -------------------------------------------------------------------------


def test_tracking_calls_refuse_what_the_store_cannot_hold(backend: str) -> None:
    with keel.start_run(experiment="bv") as run:
        keel.log_param("kept", "yes")
        cases: list[tuple[Any, str, str]] = [
            (
                lambda: keel.log_param(NUL_KEY, "v"),
                "param key",
                "NUL character ('\\x00') at position 3",
            ),
            (lambda: keel.log_params({"ok": "a\x00"}), "param value", "at position 1"),
            (
                lambda: keel.log_param(LONE, "v"),
                "param key",
                "lone surrogate ('\\ud800') at position 3",
            ),
            (lambda: keel.set_tag("t", LONE), "tag value", "lone surrogate"),
            (lambda: keel.set_tags({NUL_KEY: "x"}), "tag key", "NUL character"),
            (lambda: keel.log_metric(NUL_KEY, 1.0), "metric key", "NUL character"),
            (lambda: keel.log_metric(LONE, 1.0), "metric key", "lone surrogate"),
            (lambda: keel.log_metric("m", 1.0, step=2**63), "metric step", "fit in 64 bits"),
            (lambda: keel.log_metrics({"m": 1.0}, step=-(2**63) - 1), "metric step", "64 bits"),
            (lambda: keel.log_metric("m", 10**400), "metric value", "too large for a float"),
            (
                lambda: keel.log_metric("m", 1.0, timestamp=float("inf")),
                "metric timestamp",
                "finite",
            ),
            (lambda: keel.log_text("x", "notes\x00.txt"), "artifact path", "NUL character"),
            (lambda: keel.log_text(LONE, "notes.txt"), "text", "lone surrogate"),
            (lambda: keel.log_text("x", "d/" + "p" * 1000), "artifact path", "at most 1000 fit"),
            (lambda: keel.set_experiment(NUL_KEY), "experiment name", "NUL character"),
            (lambda: keel.start_run(run_name=LONE), "run_name", "lone surrogate"),
            (lambda: keel.start_run(tags={"t": NUL_KEY}), "tag value", "NUL character"),
            (
                lambda: keel.register_model("m", "runs:/x/model", description=LONE),
                "description",
                "lone surrogate",
            ),
        ]
        for call, field, problem in cases:
            with pytest.raises(InvalidValueError) as info:
                call()
            error = info.value
            assert isinstance(error, TrackingError) and isinstance(error, ValueError)
            assert error.field == field, (field, str(error))
            assert problem in error.message, (problem, error.message)
        keel.log_metric("m", 2.0, step=2**62)  # 64-bit steps are fine on both databases
    data = keel.Client().run(run.id)
    assert data.status == "SUCCEEDED"
    assert data.data.params == {"kept": "yes"}
    assert data.metric_history("m")[0].step == 2**62
    assert keel.Client().run(run.id).logged_artifacts() == []
    # start_run refused its bad tag before creating a run, so none was left behind.
    assert [r["run_id"] for r in keel.search_runs("bv", output_format="list")] == [run.id]


# -- the MLflow routes --------------------------------------------------------------------------


@pytest.fixture
def mlflow_url(backend: str) -> Iterator[str]:
    app = make_app()
    try:
        with live_server(app) as url:
            yield f"{url}/api/2.0/mlflow"
    finally:
        stop(app)


def _post(url: str, path: str, raw: str) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(url + path, content=raw.encode(), headers=headers, timeout=60)


def _string(text: str) -> str:
    """A JSON string literal; lone surrogates stay escapes, as a client would send them."""
    return json.dumps(text)


BIG = str(2**70)


def _cases(run: str, exp: str) -> list[tuple[str, str, str]]:
    """(route, body, the field the answer must name) for each bad value."""
    cases: list[tuple[str, str, str]] = []
    for text in (NUL_KEY, LONE):
        bad = _string(text)
        runs_filter = _string(f"params.p = '{text}'")
        models_filter = _string(f"name = '{text}'")
        cases += [
            (
                "/runs/log-metric",
                f'{{"run_id":"{run}","key":{bad},"value":1,"timestamp":1,"step":0}}',
                "key",
            ),
            ("/runs/log-parameter", f'{{"run_id":"{run}","key":{bad},"value":"v"}}', "key"),
            ("/runs/log-parameter", f'{{"run_id":"{run}","key":"p2","value":{bad}}}', "value"),
            ("/runs/set-tag", f'{{"run_id":"{run}","key":"t","value":{bad}}}', "value"),
            (
                "/runs/log-batch",
                f'{{"run_id":"{run}","params":[{{"key":"p3","value":{bad}}}]}}',
                "params[0].value",
            ),
            (
                "/runs/log-batch",
                f'{{"run_id":"{run}","tags":[{{"key":{bad},"value":"x"}}]}}',
                "tags[0].key",
            ),
            ("/experiments/create", f'{{"name":{bad}}}', "name"),
            ("/runs/create", f'{{"experiment_id":"{exp}","run_name":{bad}}}', "run_name"),
            (
                "/runs/create",
                f'{{"experiment_id":"{exp}","tags":[{{"key":"k","value":{bad}}}]}}',
                "tags[0].value",
            ),
            ("/registered-models/create", f'{{"name":{bad}}}', "name"),
            ("/model-versions/create", f'{{"name":"kept-model","source":{bad}}}', "source"),
            ("/runs/search", f'{{"experiment_ids":["{exp}"],"filter":{runs_filter}}}', "filter"),
            ("/registered-models/search", f'{{"filter":{models_filter}}}', "filter"),
        ]
    cases += [
        (
            "/runs/log-metric",
            f'{{"run_id":"{run}","key":"m","value":1,"timestamp":1,"step":{BIG}}}',
            "step",
        ),
        (
            "/runs/log-metric",
            f'{{"run_id":"{run}","key":"m","value":1,"timestamp":{BIG},"step":0}}',
            "timestamp",
        ),
        (
            "/runs/log-metric",
            f'{{"run_id":"{run}","key":"m","value":{10**400},"timestamp":1}}',
            "numeric value",
        ),
        (
            "/runs/log-batch",
            f'{{"run_id":"{run}","metrics":[{{"key":"m","value":1,"timestamp":1,"step":{BIG}}}]}}',
            "step",
        ),
        ("/runs/create", f'{{"experiment_id":"{exp}","start_time":{BIG}}}', "start_time"),
        ("/runs/update", f'{{"run_id":"{run}","end_time":{BIG}}}', "end_time"),
    ]
    return cases


def test_mlflow_routes_answer_400_naming_the_field_and_keep_what_was_recorded(
    mlflow_url: str,
) -> None:
    exp = _post(mlflow_url, "/experiments/create", '{"name":"kept"}').json()["experiment_id"]
    created = _post(mlflow_url, "/runs/create", f'{{"experiment_id":"{exp}"}}').json()
    run = created["run"]["info"]["run_id"]
    good = (
        f'{{"run_id":"{run}","params":[{{"key":"p","value":"1"}}],'
        '"tags":[{"key":"t","value":"x"}],'
        '"metrics":[{"key":"m","value":0.5,"timestamp":1000,"step":3}]}'
    )
    assert _post(mlflow_url, "/runs/log-batch", good).status_code == 200
    assert (
        _post(mlflow_url, "/registered-models/create", '{"name":"kept-model"}').status_code == 200
    )
    before = httpx.get(f"{mlflow_url}/runs/get", params={"run_id": run}, timeout=60).json()

    wrong = []
    for path, body, field in _cases(run, exp):
        reply = _post(mlflow_url, path, body)
        answer = reply.json()
        if (
            reply.status_code != 400
            or answer.get("error_code") != "INVALID_PARAMETER_VALUE"
            or not re.search(rf"(^|\W){re.escape(field)}\W", answer.get("message", ""))
        ):
            wrong.append((path, body[:90], reply.status_code, answer))
    assert wrong == []

    after = httpx.get(f"{mlflow_url}/runs/get", params={"run_id": run}, timeout=60).json()
    assert after == before
    assert after["run"]["data"]["params"] == [{"key": "p", "value": "1"}]
    assert after["run"]["data"]["metrics"][0]["step"] == 3
    history = httpx.get(
        f"{mlflow_url}/metrics/get-history", params={"run_id": run, "metric_key": "m"}, timeout=60
    ).json()
    assert [(p["value"], p["step"]) for p in history["metrics"]] == [(0.5, 3)]
    search = _post(mlflow_url, "/experiments/search", '{"max_results":100}').json()
    names = [e["name"] for e in search["experiments"]]
    assert "kept" in names and not [n for n in names if n.startswith("bad")]
    models = _post(mlflow_url, "/registered-models/search", "{}").json()
    assert [m["name"] for m in models["registered_models"]] == ["kept-model"]
    # Ids too large for a stored row name nothing: 404, not a database error.
    for path in (f"/experiments/get?experiment_id={BIG}", f"/runs/get?run_id={run}-{BIG}"):
        reply = httpx.get(mlflow_url + path, timeout=60)
        assert (reply.status_code, reply.json()["error_code"]) == (404, "RESOURCE_DOES_NOT_EXIST")


# -- keel's own REST API ------------------------------------------------------------------------


def test_rest_api_answers_400_naming_the_parameter(api: Any) -> None:
    """On both databases alike (SQLite would look a NUL up, PostgreSQL refuse it)."""
    cases = [
        ("GET", "/api/v1/runs/ab%00c", "run_id"),
        ("GET", "/api/v1/runs?workflow=a%00b", "workflow"),
        ("GET", "/api/v1/experiments/a%00b", "experiment"),
        ("GET", "/api/v1/audit?actor=a%00b", "actor"),
        ("PUT", "/api/v1/models/m/aliases/a%00b", "alias"),
        ("POST", "/api/v1/triggers/a%00b", "name"),
    ]
    for method, path, field in cases:
        # A webhook call needs its token before anything else is looked at.
        headers = {"X-Keel-Trigger-Token": "t"} if "/triggers/" in path else {}
        reply = api.request(
            method, path, json={"version": 1} if method == "PUT" else {}, headers=headers
        )
        body = reply.json()["error"]
        assert (reply.status_code, body["code"]) == (400, "bad_request"), (path, body)
        assert body["details"] == {"field": field}, (path, body)
        assert "has a NUL character ('\\x00')" in body["message"]
    # A lone surrogate in a JSON body is refused by the request's model, naming the field.
    reply = api.post(
        "/api/v1/runs/r1/signal",
        content=b'{"name": "\\ud800"}',
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 422
    assert reply.json()["error"]["details"][0]["loc"] == ["body", "name"]
    # Refused requests are audited (with the NUL escaped), not turned into a 500.
    audited = api.get("/api/v1/audit").json()["entries"]
    assert {e["path"] for e in audited} >= {
        "/api/v1/models/m/aliases/a\\x00b",
        "/api/v1/triggers/a\\x00b",
    }


@keel.workflow(name="bv_echo")
def echo(text: str) -> str:
    return text


def test_a_workflow_parameter_with_a_nul_is_tracked_escaped(backend: str) -> None:
    handle = keel.run(echo, text="a\x00b")
    assert handle.result() == "a\x00b"  # the workflow gets the value itself
    assert keel.Client().run(handle.id).data.params == {"text": "a\\x00b"}
