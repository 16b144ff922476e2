"""Issue #9, the server's front door (items 1, 2, 4, 5a, 5b, 7).

Who may come in (the auth mode is fixed, revoking never opens it), what they may send
(the token is checked and bodies are capped before they are read, JSON nesting is
limited), from where (Host, Origin, content types: no HTML form on another site can
change anything), what the audit log keeps (no secrets, no anonymous 401s, the row
committed with the change) and what a client sees while the database is away (503 with
Retry-After). The body tests use a real `keel server` process, one per module and store,
and measure its memory from /proc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from conftest import PG_URL
from keel.server import auth
from keel.server.guard import MIB, GateConfig, nests_deeper
from keel.store.metadata import open_store
from server_support import (
    DEADLINE,
    Proxy,
    assert_error,
    client,
    free_port,
    launch,
    make_app,
    tokens,
    wait_status,
    wait_until,
)

REPO = Path(__file__).resolve().parents[2]
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "http://evil.example"}


# -- 1. the auth mode ---------------------------------------------------------------------------


def test_revoking_every_token_never_opens_the_server(app: FastAPI) -> None:
    anonymous = client(app)
    # A fresh loopback server with no token ever: the local admin.
    made = anonymous.post("/api/v1/tokens", json={"name": "first", "role": "admin"})
    assert made.status_code == 201, made.text
    admin = client(app, made.json()["token"])
    assert_error(anonymous.get("/api/v1/runs"), 401, "unauthenticated")
    assert admin.delete("/api/v1/tokens/first").status_code == 200
    assert auth.list_tokens(open_store())[0]["revoked"] is True
    # No live token is left; the server stays closed (today it minted an admin token).
    assert_error(anonymous.post("/api/v1/tokens", json={"name": "mine", "role": "admin"}), 401)
    assert_error(anonymous.get("/api/v1/runs"), 401)
    assert [t["name"] for t in auth.list_tokens(open_store())] == ["first"]
    # A server started later on the same store is closed from the start.
    again = make_app()
    assert_error(client(again).get("/api/v1/runs"), 401)
    mlflow_reply = client(again).post("/api/2.0/mlflow/experiments/create", json={"name": "x"})
    assert mlflow_reply.status_code == 401, mlflow_reply.text


def test_beyond_loopback_anonymous_callers_are_refused(backend: str) -> None:
    wide = make_app_with(GateConfig(bind_host="0.0.0.0", allowed_hosts=("testserver",)))
    reply = client(wide).get("/api/v1/runs")
    assert_error(reply, 401, "unauthenticated")
    mlflow_reply = client(wide).get("/api/2.0/mlflow/experiments/search?max_results=5")
    assert mlflow_reply.status_code == 401
    assert mlflow_reply.json()["error_code"] == "UNAUTHENTICATED"
    # Explicitly insecure: served, until a token is created.
    loose = make_app_with(
        GateConfig(bind_host="0.0.0.0", allowed_hosts=("testserver",), insecure_no_auth=True)
    )
    assert client(loose).get("/api/v1/runs").status_code == 200
    auth.create_token(open_store(), "ops", "operator")
    assert_error(client(loose).get("/api/v1/runs"), 401)


def make_app_with(gate: GateConfig) -> FastAPI:
    from keel.server.app import create_app

    return create_app(open_store(), gate)


def _keel(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
        check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_SERVER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])
    env.update(extra)
    return env


def test_a_server_beyond_loopback_without_a_token_refuses_to_start(keel_home: Path) -> None:
    refused = _keel("server", "--host", "0.0.0.0", "--port", str(free_port()), env=_env())
    assert refused.returncode == 2, refused.stderr
    assert "refusing to listen on 0.0.0.0" in refused.stderr
    assert "--insecure-no-auth" in refused.stderr
    port = free_port()
    command = ["server", "--insecure-no-auth", "--host", "0.0.0.0", "--port", str(port)]
    server = subprocess.Popen(
        [sys.executable, "-m", "keel", *command],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        assert server.stderr is not None
        first = server.stderr.readline()
        assert first.startswith("WARNING: --insecure-no-auth"), first
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base), "the insecure server to answer", 60)
        assert httpx.get(f"{base}/api/v1/runs").status_code == 200
    finally:
        server.terminate()
        server.wait(DEADLINE)
        if server.stderr is not None:
            server.stderr.close()


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v1/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# -- 2. bodies: the token before the body, size caps, nesting, on a real server -----------------


class Served:
    def __init__(self, base: str, token: str, pid: int, env: dict[str, str]) -> None:
        self.base = base
        self.token = token
        self.pid = pid
        self.env = env

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=DEADLINE
        )

    def rss(self) -> int:
        """The server process's resident memory in bytes (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pg_reason: str | None,
) -> Iterator[Served]:
    """A real `keel server` process on a free loopback port, with an admin token, a
    4 MiB JSON cap and a 16 MiB upload cap; one per module and store."""
    home = tmp_path_factory.mktemp("served")
    env = _env(
        KEEL_HOME=str(home),
        KEEL_SERVER_MAX_BODY=str(4 * MIB),
        KEEL_SERVER_MAX_UPLOAD=str(16 * MIB),
    )
    env.pop("KEEL_DB_URL", None)
    schema = None
    admin_engine = None
    if request.param == "postgres":
        if pg_reason is not None:
            pytest.fail(f"PostgreSQL unreachable: {pg_reason}")
        schema = f"t_{uuid.uuid4().hex[:12]}"
        admin_engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
        with admin_engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        env["KEEL_DB_URL"] = f"{PG_URL}?options=-csearch_path%3D{schema}"
    made = _keel("token", "create", "admin", "--role", "admin", env=env)
    assert made.returncode == 0, made.stderr
    port = free_port()
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "server", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or _answers(base), "the server to start", 60)
        assert proc.poll() is None, (home / "server.log").read_text()
        yield Served(base, made.stdout.strip(), proc.pid, env)
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
        log.close()
        if admin_engine is not None:
            with admin_engine.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
            admin_engine.dispose()


def _json_stream(total: int) -> Iterator[bytes]:
    """A JSON object of `total` bytes, in 1 MiB pieces (never whole in this process)."""
    head, tail = b'{"name": "', b'"}'
    yield head
    left = total - len(head) - len(tail)
    piece = b"x" * MIB
    while left > 0:
        yield piece[: min(left, MIB)]
        left -= MIB
    yield tail


BIG = 200 * MIB


def _send(url: str, headers: dict[str, str], sized: bool, method: str = "POST") -> int:
    """Send a 200 MiB body (with Content-Length, or chunked without one); the status."""
    if sized:
        headers = {**headers, "Content-Length": str(BIG)}
    with httpx.Client(timeout=DEADLINE) as http:
        reply = http.request(method, url, content=_json_stream(BIG), headers=headers)
        return reply.status_code


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_a_huge_body_without_a_token_is_refused_before_it_is_read(
    served: Served, sized: bool
) -> None:
    before = served.rss()
    json_type = {"Content-Type": "application/json"}
    assert _send(f"{served.base}/api/v1/tokens", json_type, sized) == 401
    assert _send(f"{served.base}/api/2.0/mlflow/experiments/create", json_type, sized) == 401
    grown = served.rss() - before
    assert grown < 100 * MIB, f"the server grew by {grown // MIB} MiB for two 200 MiB bodies"


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_the_cap_gets_413_and_memory_stays_flat(served: Served, sized: bool) -> None:
    auth_json = {"Authorization": f"Bearer {served.token}", "Content-Type": "application/json"}
    before = served.rss()
    assert _send(f"{served.base}/api/v1/tokens", auth_json, sized) == 413
    assert _send(f"{served.base}/api/2.0/mlflow/experiments/create", auth_json, sized) == 413
    grown = served.rss() - before
    assert grown < 100 * MIB, f"the server grew by {grown // MIB} MiB for two 200 MiB bodies"
    with served.admin() as api:
        names = [t["name"] for t in api.get("/api/v1/tokens").json()]
        assert names == ["admin"]


def test_uploads_stream_under_their_own_cap(served: Served) -> None:
    with served.admin() as api:
        exp = api.post("/api/2.0/mlflow/experiments/create", json={"name": "uploads"})
        assert exp.status_code == 200, exp.text
        run = api.post(
            "/api/2.0/mlflow/runs/create", json={"experiment_id": exp.json()["experiment_id"]}
        ).json()["run"]["info"]
        where = f"/api/2.0/mlflow-artifacts/artifacts/{run['experiment_id']}/{run['run_id']}"
        # Larger than the JSON cap (4 MiB), within the upload cap (16 MiB); the type the
        # mlflow client sends (a guessed one).
        blob = os.urandom(6 * MIB)
        put = api.put(
            f"{where}/artifacts/model.pkl",
            content=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert put.status_code == 200, put.text
        assert api.get(f"{where}/artifacts/model.pkl").content == blob
        chunks = (os.urandom(MIB) for _ in range(20))  # 20 MiB, chunked: no length
        over = api.put(f"{where}/artifacts/big.bin", content=chunks)
        assert over.status_code == 413, over.text
        assert over.json()["error_code"] == "BAD_REQUEST"
        sized = api.put(
            f"{where}/artifacts/big.bin",
            content=_json_stream(BIG),
            headers={"Content-Length": str(BIG)},
        )
        assert sized.status_code == 413
        listed = api.get(
            "/api/2.0/mlflow-artifacts/artifacts",
            params={"path": f"{run['experiment_id']}/{run['run_id']}/artifacts"},
        ).json()
        assert [f["path"] for f in listed.get("files", [])] == ["model.pkl"]


def test_deeply_nested_json_is_a_400_naming_the_problem(served: Served) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with served.admin() as api:
        for path in ("/api/v1/workflows/arith/runs", "/api/v1/tokens"):
            reply = api.post(path, content=deep, headers={"Content-Type": "application/json"})
            error = assert_error(reply, 400, "json_too_deep")
            assert "nests deeper than 64" in error["message"]
        nested: Any = {"name": "x"}
        for _ in range(70):
            nested = {"a": nested}
        reply = api.post("/api/2.0/mlflow/experiments/create", json=nested)
        assert reply.status_code == 400, reply.text
        assert "nests deeper than 64" in reply.json()["message"]
        # Brackets inside strings are text, not nesting.
        fine = api.post("/api/2.0/mlflow/experiments/create", json={"name": "[" * 200})
        assert fine.status_code == 200, fine.text


def test_the_nesting_check_reads_strings_as_text() -> None:
    assert not nests_deeper(json.dumps({"a": '\\"[[[[[[', "b": "{{{{{{"}).encode(), 2)
    assert nests_deeper(json.dumps({"a": "x\\", "b": [[[1]]]}).encode(), 3)
    assert not nests_deeper(json.dumps({"a": "x\\", "b": [[1]]}).encode(), 3)
    assert nests_deeper(b"[" * 100_000 + b"]" * 100_000, 64)
    assert not nests_deeper(json.dumps([{"k": i} for i in range(10_000)]).encode(), 64)


# -- 4. cross-site requests ---------------------------------------------------------------------


def _mlflow_experiment(api: Any, name: str) -> str:
    reply = api.post("/api/2.0/mlflow/experiments/create", json={"name": name})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["experiment_id"])


def test_html_forms_from_another_site_change_nothing(app: FastAPI) -> None:
    # The default local server: no token, so a browser's request would be admin.
    api = client(app)
    exp_id = _mlflow_experiment(api, "kept")
    run = api.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp_id}).json()
    run_id = run["run"]["info"]["run_id"]
    failed = launch(api, "failing")
    wait_status(api, failed["id"], "FAILED")
    runs_before = len(api.get("/api/v1/runs").json()["runs"])

    attacks = [
        (f"/api/2.0/mlflow/runs/delete?run_id={run_id}", f"run_id={run_id}"),
        (f"/api/2.0/mlflow/experiments/delete?experiment_id={exp_id}", f"experiment_id={exp_id}"),
        (f"/api/v1/runs/{failed['id']}/retry", ""),
    ]
    for url, form in attacks:
        # From another site: refused for its origin.
        assert_forbidden(api.post(url, content=form, headers=FORM), url)
        # A form with no Origin (an old browser): refused for its content type.
        plain = api.post(url, content=form, headers={"Content-Type": FORM["Content-Type"]})
        assert plain.status_code == 415, (url, plain.text)
        # A body-less cross-site POST (fetch no-cors) is refused by its Origin too.
        bare = api.post(url, headers={"Origin": "http://evil.example"})
        assert bare.status_code == 403, (url, bare.text)
        text = api.post(url, content=form, headers={"Content-Type": "text/plain"})
        assert text.status_code == 415, (url, text.text)
    # The same routes with arguments only in the query string and a JSON content type do
    # nothing either: a change takes its arguments from the JSON body.
    from_query = api.post(
        f"/api/2.0/mlflow/runs/delete?run_id={run_id}", headers={"Content-Type": "application/json"}
    )
    assert from_query.status_code == 400, from_query.text

    got = api.get("/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()
    assert got["run"]["info"]["lifecycle_stage"] == "active"
    got_exp = api.get("/api/2.0/mlflow/experiments/get", params={"experiment_id": exp_id}).json()
    assert got_exp["experiment"]["lifecycle_stage"] == "active"
    assert len(api.get("/api/v1/runs").json()["runs"]) == runs_before
    assert api.get(f"/api/v1/runs/{failed['id']}").json()["status"] == "FAILED"
    # The server's own pages (same origin, JSON) still work.
    own = api.post(
        "/api/2.0/mlflow/runs/delete",
        json={"run_id": run_id},
        headers={"Origin": "http://testserver"},
    )
    assert own.status_code == 200, own.text


def assert_forbidden(reply: httpx.Response, url: str) -> None:
    assert reply.status_code == 403, (url, reply.text)
    if url.startswith("/api/v1"):
        assert_error(reply, 403, "cross_origin")
    else:
        assert reply.json()["error_code"] == "PERMISSION_DENIED"


def test_the_host_header_must_name_this_server(backend: str) -> None:
    strict = make_app_with(GateConfig())  # bound to 127.0.0.1, nothing else allowed
    rebinding = client(strict)  # TestClient calls itself `testserver`
    assert_error(rebinding.get("/api/v1/runs"), 400, "bad_host")
    assert_error(rebinding.get("/api/v1/health"), 400, "bad_host")
    assert client(strict).get("/api/v1/runs", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client(strict).get("/api/v1/runs", headers={"Host": "localhost"}).status_code == 200
    assert client(strict).get("/api/v1/runs", headers={"Host": "[::1]:80"}).status_code == 200
    allowed = make_app_with(GateConfig(allowed_hosts=("keel.internal",)))
    ok = client(allowed).get("/api/v1/runs", headers={"Host": "keel.internal:8765"})
    assert ok.status_code == 200
    assert_error(client(allowed).get("/api/v1/runs", headers={"Host": "evil.example"}), 400)


# -- 5a, 5b, 7. the audit log -------------------------------------------------------------------


def _audit_rows() -> list[Any]:
    from keel.store.schema import audit_log

    with open_store().engine.connect() as conn:
        return list(conn.execute(sa.select(audit_log).order_by(audit_log.c.id)))


def test_the_audit_log_keeps_no_webhook_token_and_no_anonymous_401(app: FastAPI) -> None:
    from keel.scheduler import triggers

    tokens(open_store())  # the server now asks for tokens
    secret = triggers.add("hook", "flows.server_flows:arith", webhook=True, params={"y": 2})
    secret_token = secret.config["token"]
    outsider = client(app)
    fired = outsider.post(f"/api/v1/triggers/hook?token={secret_token}&via=ci", json={"x": 1})
    assert fired.status_code == 202, fired.text
    for _ in range(20):  # someone knocking without a token
        assert outsider.post("/api/v1/runs/nope/cancel").status_code == 401
        assert outsider.delete("/api/v1/tokens/admin").status_code == 401
        assert outsider.post("/api/v1/triggers/hook", json={"x": 1}).status_code == 401
    rows = _audit_rows()
    assert all(secret_token not in (r.detail or "") for r in rows), rows
    [webhook] = [r for r in rows if r.path == "/api/v1/triggers/hook"]
    assert (webhook.actor, webhook.status) == ("webhook:hook", 202)
    assert webhook.detail == '{"query": "token=***&via=ci"}'
    assert [r for r in rows if r.status == 401] == []


def _break_audit(backend: str) -> None:
    """Make the database fail audit rows as if it went away mid-transaction (a fault in
    the real database): on PostgreSQL a connection failure (SQLSTATE 08006), on SQLite
    an operational error (the trigger writes to a table that does not exist)."""
    with open_store().engine.begin() as conn:
        if backend == "postgres":
            conn.execute(
                sa.text(
                    "CREATE FUNCTION audit_down() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'audit store down' USING ERRCODE = '08006'; END $$ "
                    "LANGUAGE plpgsql"
                )
            )
            conn.execute(
                sa.text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON keel_audit "
                    "FOR EACH ROW EXECUTE FUNCTION audit_down()"
                )
            )
        else:
            conn.execute(
                sa.text(
                    "CREATE TRIGGER audit_down BEFORE INSERT ON keel_audit "
                    "BEGIN INSERT INTO audit_store_down VALUES (1); END"
                )
            )


def _mend_audit() -> None:
    with open_store().engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER audit_down" + (" ON keel_audit" if _pg() else "")))


def _pg() -> bool:
    return open_store().dialect == "postgresql"


def test_the_audit_row_is_committed_with_the_change(app: FastAPI, backend: str) -> None:
    api = client(app)
    _break_audit(backend)
    made = api.post("/api/2.0/mlflow/experiments/create", json={"name": "once"})
    token = api.post("/api/v1/tokens", json={"name": "once", "role": "viewer"})
    for reply in (made, token):
        # Not a success: the change was not committed either, so a retry is safe.
        assert reply.status_code == 503, reply.text
        assert reply.headers["Retry-After"] == "5"
    _mend_audit()
    found = api.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "once"})
    assert found.status_code == 404, found.text
    assert auth.list_tokens(open_store()) == []
    # The clients retry: one experiment, one token, each with its audit row.
    assert api.post("/api/2.0/mlflow/experiments/create", json={"name": "once"}).status_code == 200
    assert api.post("/api/v1/tokens", json={"name": "once", "role": "viewer"}).status_code == 201
    assert [t["name"] for t in auth.list_tokens(open_store())] == ["once"]
    rows = [(r.method, r.path, r.status, r.actor) for r in _audit_rows()]
    assert rows == [
        ("POST", "/api/2.0/mlflow/experiments/create", 200, "local"),
        ("POST", "/api/v1/tokens", 201, "local"),
    ]


def test_while_the_store_is_unreachable_clients_get_503_with_retry_after(pg_url: str) -> None:
    from keel.store.config import StoreConfig

    url = sa.engine.make_url(pg_url)
    proxy = Proxy(url.port or 5432)
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    store = open_store(StoreConfig.from_env(db_url=proxied))
    app = make_app(store)
    api = client(app)
    assert api.get("/api/v1/runs").status_code == 200
    exp = api.post("/api/2.0/mlflow/experiments/create", json={"name": "blip"}).json()
    proxy.cut()
    try:
        for method, path, body in (
            ("GET", "/api/v1/runs", None),
            ("POST", "/api/v1/tokens", {"name": "x", "role": "viewer"}),
            ("GET", "/api/2.0/mlflow/experiments/get?experiment_id=" + exp["experiment_id"], None),
            ("POST", "/api/2.0/mlflow/runs/create", {"experiment_id": exp["experiment_id"]}),
        ):
            reply = api.request(method, path, json=body)
            assert reply.status_code == 503, (path, reply.text)
            assert reply.headers["Retry-After"] == "5"
            if "mlflow" in path:
                assert reply.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
            else:
                assert_error(reply, 503, "store_unavailable")
    finally:
        proxy.restore()
    wait_until(lambda: api.get("/api/v1/runs").status_code == 200, "the store to come back")
    reply = api.post("/api/2.0/mlflow/runs/create", json={"experiment_id": exp["experiment_id"]})
    assert reply.status_code == 200, reply.text
    store.dispose()
    proxy.cut()
