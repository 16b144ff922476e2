"""The server for real: Server-Sent Events read from a uvicorn server while runs
execute, `keel server` / `keel ui` / `keel token` as processes, workflows from
keel.toml, and the runs list's plan on 100,000 runs (it walks an index, never sorts
the table)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from keel.server.routes.runs import list_statement
from keel.store.metadata import open_store
from server_support import (
    DEADLINE,
    free_port,
    launch,
    live_server,
    make_app,
    stop,
    wait_status,
    wait_until,
)


def events_of(stream: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs of a Server-Sent Events response, as they arrive."""
    name, data = "message", ""
    for line in stream.iter_lines():
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


def read_until(
    events: Iterator[tuple[str, dict[str, Any]]], done: Any, what: str
) -> list[tuple[str, dict[str, Any]]]:
    seen = []
    for event in events:
        seen.append(event)
        if done(event):
            return seen
    raise AssertionError(f"the stream ended before {what}")


@pytest.fixture
def http(backend: str) -> Iterator[httpx.Client]:
    app = make_app()
    with live_server(app) as url, httpx.Client(base_url=url, timeout=DEADLINE) as client:
        yield client
    stop(app)


def test_events_stream_run_and_step_changes_live(http: httpx.Client, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    with http.stream("GET", "/api/v1/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = events_of(stream)
        assert next(events)[0] == "hello"
        run = launch(http, "gated", params={"flag": str(flag)})
        rid = run["id"]
        before = read_until(
            events,
            lambda e: e[0] == "step" and e[1]["task"] == "wait_for" and e[1]["status"] == "RUNNING",
            "the gated step ran",
        )
        # The run is still going: the last step has not started.
        assert http.get(f"/api/v1/runs/{rid}").json()["status"] == "RUNNING"
        flag.touch()
        after = read_until(
            events,
            lambda e: e[0] == "run" and e[1]["run_id"] == rid and e[1]["status"] == "SUCCEEDED",
            "the run succeeded",
        )
    seen = before + after
    runs = [d for e, d in seen if e == "run" and d["run_id"] == rid]
    assert runs[0]["previous_status"] is None and runs[0]["workflow"] == "gated"
    assert runs[-1]["previous_status"] in ("RUNNING", "PENDING")
    steps = [(d["task"], d["status"]) for e, d in seen if e == "step" and d["run_id"] == rid]
    assert ("double", "SUCCEEDED") in steps and ("wait_for", "RUNNING") in steps
    assert steps.index(("wait_for", "RUNNING")) < steps.index(("wait_for", "SUCCEEDED"))
    assert ("add", "SUCCEEDED") in steps


def test_events_of_one_run(http: httpx.Client, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    mine = launch(http, "gated", params={"flag": str(flag)})
    with http.stream("GET", "/api/v1/events", params={"run_id": mine["id"]}) as stream:
        events = events_of(stream)
        next(events)
        other = launch(http, "arith", params={"x": 2})
        wait_status(http, other["id"], "SUCCEEDED")
        flag.touch()
        seen = read_until(
            events,
            lambda e: e[0] == "run" and e[1]["status"] == "SUCCEEDED",
            "the watched run succeeded",
        )
    assert {d["run_id"] for _, d in seen} == {mine["id"]}


def test_log_tail_follows_a_running_run(http: httpx.Client, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    run = launch(http, "gated", params={"flag": str(flag)})
    with http.stream("GET", f"/api/v1/runs/{run['id']}/logs/stream") as stream:
        events = events_of(stream)
        first = read_until(
            events, lambda e: e[0] == "log" and "doubling 1" in e[1]["text"], "the first log"
        )
        assert all(e == "log" for e, _ in first)
        flag.touch()
        rest = read_until(events, lambda e: e[0] == "end", "the end of the run")
    assert any("waiting for" in d.get("text", "") for _, d in rest)
    assert rest[-1][1]["status"] == "SUCCEEDED"


# -- the commands ------------------------------------------------------------------------------


def _keel(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_server_refuses_to_listen_beyond_loopback_without_tokens() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        done = _keel("server", "--host", host, "--port", str(free_port()))
        assert done.returncode == 2, done
        assert "refusing to listen" in done.stderr and "keel token create" in done.stderr


def test_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for command in (("server", "--port", port), ("ui", "--port", port, "--no-open")):
            done = _keel(*command)
            assert done.returncode == 2, done
            assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), done
            assert "in use" in done.stderr and "--port" in done.stderr, done.stderr
            assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.integration
def test_keel_server_process_answers(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keel",
            "server",
            "--port",
            str(port),
            "--workflows",
            str(Path(__file__).parent / "flows" / "server_flows.py"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.communicate()
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "keel server to answer", 60)
        names = [w["name"] for w in httpx.get(f"{url}/api/v1/workflows").json()]
        assert "arith" in names and "gated" in names
        run = httpx.post(f"{url}/api/v1/workflows/arith/runs", json={"params": {"x": 2}}).json()
        with httpx.Client(base_url=url, timeout=30) as client:
            assert wait_status(client, run["run"]["id"], "SUCCEEDED")["status"] == "SUCCEEDED"
        shown = _keel("ui", "--port", str(port), "--no-open")
        assert shown.returncode == 0 and f"{url}/" in shown.stdout
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"keel server on {url}/" in out


def test_token_commands() -> None:
    made = _keel("token", "create", "alice", "--role", "operator")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("keel_") and "shown only now" in made.stderr
    listed = _keel("token", "ls")
    assert "alice" in listed.stdout and "operator" in listed.stdout and token not in listed.stdout
    bad = _keel("token", "create", "bob", "--role", "root")
    assert bad.returncode != 0 and "unknown role" in bad.stderr
    twice = _keel("token", "create", "alice")
    assert twice.returncode != 0 and "exists already" in twice.stderr
    assert _keel("token", "revoke", "alice").returncode == 0
    assert "revoked" in _keel("token", "ls").stdout
    gone = _keel("token", "revoke", "nobody")
    assert gone.returncode == 2 and "no token named" in gone.stderr


def test_workflows_from_keel_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keel.cli.server_cmds import build_app

    flows = Path(__file__).parent / "flows" / "server_flows.py"
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "mine.py").write_text(
        "import keel\n\n\n@keel.workflow\ndef from_toml(n: int = 1) -> int:\n    return n\n"
    )
    (tmp_path / "keel.toml").write_text('[server]\nworkflows = ["flows/mine.py"]\n')
    monkeypatch.chdir(tmp_path)
    app = build_app(open_store(), [f"{flows}:arith", "flows/mine.py:from_toml"], "queue")
    assert [e.name for e in app.state.workflows] == ["from_toml", "arith"]
    assert app.state.dispatch == "queue"
    (tmp_path / "keel.toml").write_text("[server]\nworkflows = 3\n")
    from keel.errors import DefinitionError

    with pytest.raises(DefinitionError, match="list of strings"):
        build_app(open_store(), [], "server")


# -- 100,000 runs ---------------------------------------------------------------------------------

N = 100_000


def _fill(store: Any) -> None:
    columns = "id, workflow, status, created_at, cancel_requested, kind, lifecycle_stage"
    if store.dialect == "sqlite":
        sql = (
            f"INSERT INTO keel_runs ({columns}) WITH RECURSIVE c(i) AS "
            f"(SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < {N - 1}) "
            "SELECT printf('r%06d', i), 'wf' || (i % 10), "
            "CASE WHEN i % 3 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END, "
            "1.7e9 + i / 2, 0, 'workflow', 'active' FROM c"
        )
    else:
        sql = (
            f"INSERT INTO keel_runs ({columns}) SELECT 'r' || lpad(i::text, 6, '0'), "
            "'wf' || mod(i, 10), CASE WHEN mod(i, 3) = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END, "
            f"1.7e9 + i / 2, false, 'workflow', 'active' FROM generate_series(0, {N - 1}) i"
        )
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql)
        conn.exec_driver_sql("ANALYZE")


def _plan(store: Any, stmt: sa.Select[Any]) -> str:
    compiled = stmt.limit(51).compile(store.engine, compile_kwargs={"literal_binds": True})
    prefix = "EXPLAIN QUERY PLAN " if store.dialect == "sqlite" else "EXPLAIN "
    with store.engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + str(compiled)).all()
    return "\n".join(str(r[-1]) for r in rows)


@pytest.mark.slow
def test_runs_list_walks_an_index_at_100k_runs(backend: str) -> None:
    store = open_store()
    _fill(store)
    cases = {
        "first page": list_statement(store),
        "a later page": list_statement(store, after=(1.7e9 + 30_000, "r060000")),
        "by status": list_statement(store, status=["FAILED"]),
        "by workflow": list_statement(store, workflow="wf3"),
    }
    for what, stmt in cases.items():
        plan = _plan(store, stmt)
        if store.dialect == "sqlite":
            assert "USING INDEX ix_keel_runs" in plan, (what, plan)
            assert "TEMP B-TREE FOR ORDER BY" not in plan, (what, plan)
        else:
            assert "Index Scan Backward using ix_keel_runs" in plan, (what, plan)
            # Only ties of creation time may be sorted (an incremental sort), never the table.
            full_sorts = [x for x in plan.splitlines() if "Sort  (" in x and "Incremental" not in x]
            assert "Seq Scan" not in plan and not full_sorts, (what, plan)
    # And the pages walk correctly there too.
    app = make_app()
    from starlette.testclient import TestClient

    api = TestClient(app)
    page = api.get("/api/v1/runs", params={"limit": 1000}).json()
    assert page["runs"][0]["id"] == f"r{N - 1:06d}" and len(page["runs"]) == 1000
    following = api.get("/api/v1/runs", params={"limit": 1000, "cursor": page["next_cursor"]})
    assert following.json()["runs"][0]["id"] == f"r{N - 1001:06d}"
