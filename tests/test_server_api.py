"""REST API: workflows and launching with typed params, runs (list, filters, cursor
pagination, get), actions (cancel, resume, retry, signal), steps and attempts, logs,
auth by role, the audit log and the error replies. SQLite and PostgreSQL (`backend`)
where the store's behaviour matters."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from starlette.testclient import TestClient

from keel.scheduler.worker import Worker
from keel.store.metadata import open_store
from keel.store.schema import runs
from server_support import (
    assert_error,
    client,
    launch,
    tokens,
    wait_status,
    wait_until,
)

# -- workflows and launching -----------------------------------------------------------------


def test_health_and_openapi_document(api: TestClient) -> None:
    assert api.get("/api/v1/health").json()["status"] == "ok"
    doc = api.get("/api/v1/openapi.json").json()
    paths = set(doc["paths"])
    for path in (
        "/api/v1/runs",
        "/api/v1/runs/{run_id}",
        "/api/v1/runs/{run_id}/cancel",
        "/api/v1/runs/{run_id}/resume",
        "/api/v1/runs/{run_id}/retry",
        "/api/v1/runs/{run_id}/signal",
        "/api/v1/runs/{run_id}/steps",
        "/api/v1/runs/{run_id}/steps/{step}",
        "/api/v1/runs/{run_id}/logs",
        "/api/v1/runs/{run_id}/logs/stream",
        "/api/v1/runs/{run_id}/artifacts",
        "/api/v1/artifacts/{digest}/content",
        "/api/v1/experiments",
        "/api/v1/runs/{run_id}/metrics/history",
        "/api/v1/models/{name}/aliases/{alias}",
        "/api/v1/workflows/{name}/runs",
        "/api/v1/events",
        "/api/v1/triggers/{name}",
        "/api/v1/tokens",
        "/api/v1/audit",
    ):
        assert path in paths, path


def test_workflows_describe_their_parameters_as_json_schema(api: TestClient) -> None:
    names = [w["name"] for w in api.get("/api/v1/workflows").json()]
    assert names[:2] == ["arith", "typed"]
    typed = api.get("/api/v1/workflows/typed").json()
    schema = typed["params_schema"]
    assert schema["type"] == "object" and schema["required"] == ["count"]
    props = schema["properties"]
    assert props["count"]["type"] == "integer"
    assert props["ratio"] == {"type": "number", "default": 0.5, "title": "Ratio"}
    assert props["mode"]["enum"] == ["fast", "slow"] and props["mode"]["default"] == "fast"
    assert "Options" in schema["$defs"]
    assert api.get("/api/v1/workflows/arith").json()["description"].startswith("Doubles")
    assert_error(api.get("/api/v1/workflows/nope"), 404, "not_found")


def test_launch_runs_a_workflow_in_the_server(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 3})
    assert run["status"] in ("PENDING", "RUNNING", "SUCCEEDED") and run["params"] == {
        "x": 3,
        "y": 1,
    }
    done = wait_status(api, run["id"], "SUCCEEDED", "FAILED")
    assert done["status"] == "SUCCEEDED", done
    assert done["tags"]["keel.launched_by"] == "local"
    preview = api.get(f"/api/v1/runs/{run['id']}/result/preview").json()
    assert preview["kind"] == "json" and preview["json_value"] == 8
    # The string "3" is accepted for an int, as on the command line.
    other = launch(api, "arith", params={"x": "3", "y": 2})
    assert wait_status(api, other["id"], "SUCCEEDED")["params"] == {"x": 3, "y": 2}


def test_launch_checks_parameters_and_names_each_bad_one(api: TestClient) -> None:
    err = assert_error(api.post("/api/v1/workflows/arith/runs", json={}), 422)
    assert err["code"] == "invalid_parameters" and "'x'" in err["message"]
    assert err["details"]["problems"] == [{"parameter": "x", "message": "'x' (int) is required"}]
    err = assert_error(
        api.post(
            "/api/v1/workflows/typed/runs",
            json={"params": {"count": "many", "mode": "medium", "colour": 1}},
        ),
        422,
    )
    named = [p["parameter"] for p in err["details"]["problems"]]
    assert named == ["colour", "count", "mode"]
    assert_error(api.post("/api/v1/workflows/typed/runs", json={"params": []}), 422)
    assert_error(api.post("/api/v1/workflows/nope/runs", json={}), 404)
    assert_error(
        api.post("/api/v1/workflows/arith/runs", json={"params": {"x": 1}, "dispatch": "moon"}),
        422,
        "invalid_request",
    )
    with open_store().engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(runs)).scalar() == 0


def test_launch_to_the_queue_waits_for_a_worker(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 2}, dispatch="queue")
    assert api.get(f"/api/v1/runs/{run['id']}").json()["status"] == "PENDING"
    Worker(store=open_store(), poll_seconds=0.02).run(max_items=1, idle_exit=60)
    assert wait_status(api, run["id"], "SUCCEEDED", "FAILED")["status"] == "SUCCEEDED"


# -- runs: list, filters, pagination -----------------------------------------------------------


def _insert_runs(count: int, ties: int = 3) -> list[tuple[float, str]]:
    """`count` top-level runs whose creation times repeat in groups of `ties`."""
    base = time.time() - 10_000
    rows = []
    for i in range(count):
        created = base + (i // ties)
        rows.append(
            {
                "id": f"r{i:05d}x",
                "workflow": "alpha" if i % 2 else "beta",
                "status": "SUCCEEDED" if i % 3 else "FAILED",
                "created_at": created,
                "cancel_requested": False,
                "kind": "workflow" if i % 5 else "run",
                "lifecycle_stage": "active",
                "run_name": f"name-{i}",
                "experiment_id": 7 if i % 4 == 0 else None,
            }
        )
    with open_store().engine.begin() as conn:
        conn.execute(runs.insert(), rows)
    return sorted(((r["created_at"], r["id"]) for r in rows), reverse=True)


def test_cursor_pagination_walks_every_run_once_newest_first(api: TestClient) -> None:
    expected = _insert_runs(237)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 50}
        if cursor:
            params["cursor"] = cursor
        page = api.get("/api/v1/runs", params=params).json()
        seen.extend(r["id"] for r in page["runs"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert seen == [run_id for _, run_id in expected]
    assert_error(api.get("/api/v1/runs", params={"cursor": "garbage"}), 400, "bad_cursor")
    assert_error(api.get("/api/v1/runs", params={"cursor": "WyJ4IiwxXQ=="}), 400, "bad_cursor")
    assert_error(api.get("/api/v1/runs", params={"limit": 0}), 422, "invalid_request")


def test_run_filters_and_search(api: TestClient) -> None:
    _insert_runs(30)

    def ids(**params: Any) -> list[str]:
        return [r["id"] for r in api.get("/api/v1/runs", params=params).json()["runs"]]

    assert len(ids(workflow="alpha")) == 15
    assert len(ids(status="FAILED")) == 10
    assert len(ids(status=["FAILED", "SUCCEEDED"], limit=100)) == 30
    assert len(ids(kind="run")) == 6
    assert len(ids(experiment_id=7)) == 8
    assert ids(q="name-17") == ["r00017x"]
    assert ids(q="r0002") == [f"r0002{i}x" for i in range(9, -1, -1)]
    assert ids(q="100%_") == []
    assert_error(api.get("/api/v1/runs", params={"status": "DONE"}), 422, "invalid_request")


def test_child_runs_are_listed_under_their_parent(api: TestClient) -> None:
    _insert_runs(2)
    with open_store().engine.begin() as conn:
        conn.execute(
            runs.insert(),
            [
                {
                    "id": "r00000x.1",
                    "workflow": "child",
                    "status": "SUCCEEDED",
                    "created_at": time.time(),
                    "parent_id": "r00000x",
                    "cancel_requested": False,
                    "kind": "workflow",
                    "lifecycle_stage": "active",
                }
            ],
        )
    top = [r["id"] for r in api.get("/api/v1/runs").json()["runs"]]
    assert "r00000x.1" not in top
    assert "r00000x.1" in [
        r["id"] for r in api.get("/api/v1/runs", params={"include_children": True}).json()["runs"]
    ]
    under = api.get("/api/v1/runs", params={"parent_id": "r00000x"}).json()["runs"]
    assert [r["id"] for r in under] == ["r00000x.1"]
    assert api.get("/api/v1/runs/r00000x").json()["children"] == ["r00000x.1"]


def test_get_run_by_prefix_and_unknown_runs(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 1})
    wait_status(api, run["id"], "SUCCEEDED")
    got = api.get(f"/api/v1/runs/{run['id'][:12]}").json()
    assert got["id"] == run["id"] and got["duration"] >= 0 and got["traceback"] is None
    assert_error(api.get("/api/v1/runs/doesnotexist"), 404, "not_found")
    for path in ("steps", "logs", "result", "artifacts"):
        assert_error(api.get(f"/api/v1/runs/doesnotexist/{path}"), 404, "not_found")


# -- steps and logs -------------------------------------------------------------------------------


def test_steps_attempts_and_the_dag(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 3, "y": 4})
    wait_status(api, run["id"], "SUCCEEDED")
    page = api.get(f"/api/v1/runs/{run['id']}/steps").json()
    steps = {s["task"] + str(s["seq"]): s for s in page["steps"]}
    assert [s["task"] for s in page["steps"]] == ["double", "double", "add"]
    add = page["steps"][2]
    assert add["deps"] == [0, 1] and add["status"] == "SUCCEEDED"
    assert add["attempt_list"][0]["status"] == "SUCCEEDED" and add["attempts"] == 1
    assert steps["double0"]["has_output"] and steps["double0"]["output_type"] == "int"
    one = api.get(f"/api/v1/runs/{run['id']}/steps/0").json()
    assert one["consumers"] == [2] and one["attempt_details"][0]["traceback"] is None
    assert api.get(f"/api/v1/runs/{run['id']}/steps/add").json()["seq"] == 2
    assert api.get(f"/api/v1/runs/{run['id']}/steps/{add['key']}").json()["seq"] == 2
    err = assert_error(api.get(f"/api/v1/runs/{run['id']}/steps/double"), 404)
    assert "several" in err["message"]
    assert_error(api.get(f"/api/v1/runs/{run['id']}/steps/nothing"), 404)
    first = api.get(f"/api/v1/runs/{run['id']}/steps", params={"limit": 2}).json()
    assert len(first["steps"]) == 2 and first["next_after"] == 1
    rest = api.get(f"/api/v1/runs/{run['id']}/steps", params={"after": 1}).json()
    assert [s["seq"] for s in rest["steps"]] == [2] and rest["next_after"] is None


def test_failed_step_attempts_carry_the_error(api: TestClient) -> None:
    run = launch(api, "failing", params={"x": 5})
    done = wait_status(api, run["id"], "FAILED", "SUCCEEDED")
    assert done["status"] == "FAILED" and done["error_type"] == "ValueError"
    step = api.get(f"/api/v1/runs/{run['id']}/steps/explode").json()
    assert step["status"] == "FAILED" and step["error_message"] == "cannot handle 5"
    assert "ValueError" in step["attempt_details"][0]["traceback"]
    assert_error(api.get(f"/api/v1/runs/{run['id']}/result"), 404)


def test_log_ranges(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 3, "y": 4})
    wait_status(api, run["id"], "SUCCEEDED")
    everything = api.get(f"/api/v1/runs/{run['id']}/logs").json()
    texts = "".join(r["text"] for r in everything["records"])
    assert "doubling 3" in texts and "doubling 4" in texts
    assert everything["next_after"] is None
    assert {r["step_key"] for r in everything["records"]} <= {"double-0", "double-1"}
    first = api.get(f"/api/v1/runs/{run['id']}/logs", params={"limit": 1}).json()
    assert len(first["records"]) == 1 and first["next_after"] == first["records"][0]["id"]
    rest = api.get(f"/api/v1/runs/{run['id']}/logs", params={"after": first["next_after"]})
    assert [r["id"] for r in first["records"] + rest.json()["records"]] == [
        r["id"] for r in everything["records"]
    ]
    skipped = api.get(f"/api/v1/runs/{run['id']}/logs", params={"offset": 1}).json()
    assert skipped["records"] == rest.json()["records"]
    one = api.get(f"/api/v1/runs/{run['id']}/logs", params={"step": "1", "attempt": 1}).json()
    assert "doubling 4" in "".join(r["text"] for r in one["records"])
    assert "doubling 3" not in "".join(r["text"] for r in one["records"])
    assert_error(api.get(f"/api/v1/runs/{run['id']}/logs", params={"limit": 0}), 422)
    assert_error(api.get(f"/api/v1/runs/{run['id']}/logs", params={"step": "zzz"}), 404)


def test_log_tail_ends_with_the_run(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 6})
    wait_status(api, run["id"], "SUCCEEDED")
    with api.stream("GET", f"/api/v1/runs/{run['id']}/logs/stream") as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        body = "".join(reply.iter_text())
    events = [block for block in body.split("\n\n") if block.startswith("id:")]
    assert any("doubling 6" in e for e in events)
    assert body.rstrip().splitlines()[-2] == "event: end"
    assert '"status":"SUCCEEDED"' in body.rstrip().splitlines()[-1]
    # Continue after the last record seen: only the end comes.
    last = max(int(e.split("\n")[0].split(": ")[1]) for e in events)
    with api.stream(
        "GET", f"/api/v1/runs/{run['id']}/logs/stream", headers={"Last-Event-ID": str(last)}
    ) as reply:
        assert "event: log" not in "".join(reply.iter_text())


# -- actions ------------------------------------------------------------------------------


def test_cancel_then_resume_without_rerunning_recorded_steps(api: TestClient) -> None:
    run = launch(api, "signalled")
    rid = run["id"]

    def parked() -> bool:
        steps = api.get(f"/api/v1/runs/{rid}/steps").json()["steps"]
        status = api.get(f"/api/v1/runs/{rid}").json()["status"]
        return len(steps) == 2 and status == "PENDING"

    wait_until(parked, "the run to wait for its signal")
    reply = api.post(f"/api/v1/runs/{rid}/cancel")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"run_id": rid, "status": "CANCELLED", "message": "the run is cancelled"}
    again = api.post(f"/api/v1/runs/{rid}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "CANCELLED"
    assert_error(api.post(f"/api/v1/runs/{rid}/signal", json={"name": "go"}), 409)
    resumed = api.post(f"/api/v1/runs/{rid}/resume", json={})
    assert resumed.status_code == 202, resumed.text
    wait_until(parked, "the resumed run to wait again")
    assert api.post(f"/api/v1/runs/{rid}/signal", json={"name": "go", "payload": 5}).is_success
    done = wait_status(api, rid, "SUCCEEDED", "FAILED")
    assert done["status"] == "SUCCEEDED", done
    steps = api.get(f"/api/v1/runs/{rid}/steps").json()["steps"]
    assert steps[0]["task"] == "double" and steps[0]["attempts"] == 1
    assert api.get(f"/api/v1/runs/{rid}/result/preview").json()["json_value"] == 7
    assert_error(api.post(f"/api/v1/runs/{rid}/cancel"), 409, "conflict")
    noop = api.post(f"/api/v1/runs/{rid}/resume")
    assert noop.status_code == 202 and noop.json()["message"] == "the run already succeeded"


def test_cancel_a_running_run(api: TestClient, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    run = launch(api, "gated", params={"flag": str(flag)})
    rid = run["id"]
    wait_until(
        lambda: any(
            s["task"] == "wait_for" and s["status"] == "RUNNING"
            for s in api.get(f"/api/v1/runs/{rid}/steps").json()["steps"]
        ),
        "the gated step to run",
    )
    reply = api.post(f"/api/v1/runs/{rid}/cancel").json()
    assert reply["status"] == "RUNNING" and "asked to stop" in reply["message"]
    assert api.get(f"/api/v1/runs/{rid}").json()["cancel_requested"] is True
    flag.touch()
    wait_status(api, rid, "CANCELLED", "SUCCEEDED", "FAILED")


def test_cancel_a_queued_run(api: TestClient) -> None:
    run = launch(api, "arith", params={"x": 1}, dispatch="queue")
    reply = api.post(f"/api/v1/runs/{run['id']}/cancel").json()
    assert reply["status"] == "CANCELLED"
    # No worker starts it afterwards.
    Worker(store=open_store(), poll_seconds=0.02).run(idle_exit=0.3)
    assert api.get(f"/api/v1/runs/{run['id']}").json()["status"] == "CANCELLED"


def test_resume_on_the_queue_is_done_by_a_worker(app: FastAPI, tmp_path: Path) -> None:
    api = client(app)
    flag = tmp_path / "flag"
    flag.touch()
    run = launch(api, "failing", params={"x": 2})
    wait_status(api, run["id"], "FAILED")
    app.state.dispatch = "queue"
    reply = api.post(f"/api/v1/runs/{run['id']}/resume")
    assert reply.status_code == 202 and reply.json()["status"] == "PENDING"
    Worker(store=open_store(), poll_seconds=0.02).run(max_items=1, idle_exit=60)
    done = wait_status(api, run["id"], "FAILED", "SUCCEEDED")
    assert done["status"] == "FAILED"  # the same code fails the same way, on the worker
    steps = api.get(f"/api/v1/runs/{run['id']}/steps").json()["steps"]
    assert steps[0]["attempts"] == 1  # double was recorded and not run again


def test_retry_reuses_succeeded_steps(api: TestClient) -> None:
    run = launch(api, "failing", params={"x": 4})
    wait_status(api, run["id"], "FAILED")
    reply = api.post(f"/api/v1/runs/{run['id']}/retry")
    assert reply.status_code == 202, reply.text
    new_id = reply.json()["run_id"]
    assert new_id != run["id"]
    done = wait_status(api, new_id, "FAILED", "SUCCEEDED")
    assert done["retry_of"] == run["id"]
    steps = api.get(f"/api/v1/runs/{new_id}/steps").json()["steps"]
    assert steps[0]["cached_from"] is not None
    assert_error(api.post("/api/v1/runs/nope/retry"), 404)


def test_retry_and_resume_refuse_unfinished_or_child_runs(api: TestClient) -> None:
    _insert_runs(1)
    with open_store().engine.begin() as conn:
        conn.execute(runs.update().values(status="RUNNING", host="elsewhere", pid=1))
    assert_error(api.post("/api/v1/runs/r00000x/retry"), 409, "conflict")
    err = assert_error(api.post("/api/v1/runs/r00000x/resume"), 409, "conflict")
    assert "still running" in err["message"]
    with open_store().engine.begin() as conn:
        conn.execute(runs.update().values(parent_id="zzz", status="FAILED"))
    assert_error(api.post("/api/v1/runs/r00000x/resume"), 409, "conflict")
    assert_error(api.post("/api/v1/runs/r00000x/retry"), 409, "conflict")


def test_retry_of_a_run_whose_code_is_gone_answers_at_once(api: TestClient) -> None:
    _insert_runs(1)  # workflow "beta", recorded without an entry point
    reply = api.post("/api/v1/runs/r00000x/retry")
    assert 400 <= reply.status_code < 500, reply.text
    assert "beta" in reply.json()["error"]["message"]
    with open_store().engine.connect() as conn:
        assert conn.execute(sa.select(runs.c.id).where(runs.c.retry_of == "r00000x")).all() == []


def test_signal_wakes_a_waiting_run(api: TestClient) -> None:
    run = launch(api, "waits_for_signal")
    rid = run["id"]
    wait_until(
        lambda: api.get(f"/api/v1/runs/{rid}/steps").json()["steps"], "the wait to be recorded"
    )
    reply = api.post(f"/api/v1/runs/{rid}/signal", json={"name": "go", "payload": {"n": 1}})
    assert reply.status_code == 200, reply.text
    assert wait_status(api, rid, "SUCCEEDED", "FAILED")["status"] == "SUCCEEDED"
    assert api.get(f"/api/v1/runs/{rid}/result/preview").json()["json_value"] == {"n": 1}
    assert_error(api.post(f"/api/v1/runs/{rid}/signal", json={"name": "go"}), 409)
    assert_error(api.post(f"/api/v1/runs/{rid}/signal", json={"name": ""}), 422)
    assert_error(api.post(f"/api/v1/runs/{rid}/signal", json={}), 422)


# -- auth, roles and the audit log -------------------------------------------------------


def test_roles(app: FastAPI) -> None:
    store = open_store()
    keys = tokens(store)
    anonymous = client(app)
    viewer, operator, admin = (client(app, keys[r]) for r in ("viewer", "operator", "admin"))
    assert_error(anonymous.get("/api/v1/runs"), 401, "unauthenticated")
    assert_error(client(app, "keel_wrong").get("/api/v1/runs"), 401, "unauthenticated")
    bad_scheme = TestClient(app, headers={"Authorization": f"Basic {keys['admin']}"})
    assert_error(bad_scheme.get("/api/v1/runs"), 401)
    assert anonymous.get("/api/v1/health").status_code == 200

    assert viewer.get("/api/v1/runs").status_code == 200
    assert viewer.get("/api/v1/me").json() == {
        "name": "viewer",
        "role": "viewer",
        "tokens_required": True,
    }
    assert_error(viewer.post("/api/v1/workflows/arith/runs", json={"params": {"x": 1}}), 403)
    run = launch(operator, "arith", params={"x": 1})
    assert wait_status(viewer, run["id"], "SUCCEEDED")["tags"]["keel.launched_by"] == "operator"
    assert_error(viewer.post(f"/api/v1/runs/{run['id']}/cancel"), 403, "forbidden")
    assert_error(viewer.post(f"/api/v1/runs/{run['id']}/retry"), 403)
    assert_error(viewer.post(f"/api/v1/runs/{run['id']}/resume"), 403)
    assert operator.post(f"/api/v1/runs/{run['id']}/resume").status_code == 202
    assert_error(operator.get("/api/v1/tokens"), 403)
    assert_error(operator.get("/api/v1/audit"), 403)
    assert_error(operator.post("/api/v1/tokens", json={"name": "x", "role": "admin"}), 403)

    created = admin.post("/api/v1/tokens", json={"name": "ci-bot", "role": "operator"})
    assert created.status_code == 201
    bot = client(app, created.json()["token"])
    assert bot.get("/api/v1/me").json()["role"] == "operator"
    listed = admin.get("/api/v1/tokens").json()
    assert [t["name"] for t in listed] == ["viewer", "operator", "admin", "ci-bot"]
    assert all("token" not in t and "token_hash" not in t for t in listed)
    assert_error(admin.post("/api/v1/tokens", json={"name": "ci-bot", "role": "viewer"}), 409)
    assert_error(admin.post("/api/v1/tokens", json={"name": "x", "role": "root"}), 422)
    assert admin.delete("/api/v1/tokens/ci-bot").json()["revoked"] is True
    assert_error(bot.get("/api/v1/runs"), 401)
    assert_error(admin.delete("/api/v1/tokens/nobody"), 404)

    entries = admin.get("/api/v1/audit").json()["entries"]
    seen = {(e["actor"], e["method"], e["path"].split("/")[3], e["status"]) for e in entries}
    assert ("operator", "POST", "workflows", 202) in seen
    assert ("viewer", "POST", "workflows", 403) in seen
    assert ("admin", "POST", "tokens", 201) in seen
    assert ("admin", "DELETE", "tokens", 200) in seen
    mine = admin.get("/api/v1/audit", params={"actor": "operator", "limit": 1}).json()
    assert len(mine["entries"]) == 1 and mine["next_before"] is not None
    older = admin.get("/api/v1/audit", params={"before": mine["next_before"]}).json()
    assert all(e["id"] < mine["next_before"] for e in older["entries"])
    assert all(e["method"] != "GET" for e in entries)


def test_without_tokens_every_caller_is_the_local_admin(api: TestClient) -> None:
    assert api.get("/api/v1/me").json() == {
        "name": "local",
        "role": "admin",
        "tokens_required": False,
    }
    assert api.get("/api/v1/tokens").json() == []


# -- error replies ------------------------------------------------------------------------------


def test_errors_are_json_without_traces(app: FastAPI) -> None:
    @app.get("/api/v1/_boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    api = client(app)
    err = assert_error(api.get("/api/v1/_boom"), 500, "internal")
    assert "secret" not in err["message"]
    assert_error(api.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(api.delete("/api/v1/runs"), 405, "method_not_allowed")
    assert_error(
        api.post(
            "/api/v1/workflows/arith/runs",
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        422,
        "invalid_request",
    )
    assert_error(api.get("/api/v1/runs", params={"limit": "many"}), 422)


def test_nan_in_parameters_does_not_break_replies(api: TestClient) -> None:
    reply = api.post(
        "/api/v1/workflows/typed/runs",
        content=b'{"params": {"count": 1, "ratio": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert reply.status_code in (202, 422), reply.text
    listed = api.get("/api/v1/runs")
    assert listed.status_code == 200
    json.loads(listed.text)  # strict JSON: no NaN literal
