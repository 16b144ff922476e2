"""Issue #9 for `keel serve`: the endpoints stand behind the guard of `keel server`.

A page on another site cannot start runs on a user's local `keel serve` (foreign
Origin, Sec-Fetch-Site, form and text/plain bodies are refused before anything is
written), a DNS-rebinding page is refused by Host, and beyond loopback nobody calls
without an API token of the right role, checked before the body is read; bodies are
capped before they are parsed. Two real `keel serve` processes per store: one on
loopback without tokens, one on 0.0.0.0 (called via 127.0.0.1) with tokens.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

import keel
from conftest import fresh_pg_schema
from flows import server_flows
from flows.serving_flows import Offset
from keel.errors import ServingError
from keel.server import auth
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store
from server_support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TARGET = f"{ROOT / 'tests' / 'flows' / 'serving_flows.py'}:pipeline"
BOUND = 60.0  # a bound on waits; reaching it is a failure, never a measurement
CAP = 4096  # --max-body-bytes of the loopback server
EVIL = "http://evil.example"
FORM = {"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL}


@dataclass
class Server:
    url: str
    port: int
    store: MetadataStore
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    log: Any


@dataclass
class Site:
    local: Server  # 127.0.0.1, no token ever created
    wide: Server  # 0.0.0.0 with --allowed-host keel.example; tokens by role
    keys: dict[str, str]


@contextmanager
def _database(kind: str, folder: Path, pg_reason: str | None) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'keel.db'}"
        return
    with fresh_pg_schema(pg_reason) as url:
        yield url


def _env(folder: Path, db_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(
        KEEL_HOME=str(folder),
        KEEL_DB_URL=db_url,
        KEEL_ARTIFACTS=str(folder / "artifacts"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
    )
    return env


def _store(env: dict[str, str]) -> MetadataStore:
    return open_store(StoreConfig(db_url=env["KEEL_DB_URL"], artifacts_url=env["KEEL_ARTIFACTS"]))


def _start(env: dict[str, str], *args: str) -> Server:
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in _stop
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "serve", TARGET, "--port", str(port), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    server = Server(url, port, _store(env), env, proc, log)

    def up() -> bool:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"keel serve exited: {log.read().decode(errors='replace')}")
        try:
            return httpx.get(f"{url}/ping", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, "keel serve to answer /ping", BOUND)
    return server


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
    try:
        server.proc.wait(BOUND)
    finally:
        server.log.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def site(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_reason: str | None
) -> Iterator[Site]:
    kind = str(request.param)
    local_dir = tmp_path_factory.mktemp(f"gate-local-{kind}")
    wide_dir = tmp_path_factory.mktemp(f"gate-wide-{kind}")
    with (
        _database(kind, local_dir, pg_reason) as local_db,
        _database(kind, wide_dir, pg_reason) as wide_db,
    ):
        wide_env = _env(wide_dir, wide_db)
        keys = {role: auth.create_token(_store(wide_env), role, role) for role in auth.ROLES}
        local = _start(_env(local_dir, local_db), "--max-body-bytes", str(CAP))
        try:
            wide = _start(wide_env, "--host", "0.0.0.0", "--allowed-host", "keel.example")
            try:
                yield Site(local, wide, keys)
            finally:
                _stop(wide)
        finally:
            _stop(local)


def runs_of(server: Server) -> int:
    return len(keel.Client(store=server.store).runs(workflow="pipeline", limit=None))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def error_of(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["code"] == code, error
    return error


def headers_only(server: Server, path: str, headers: dict[str, str]) -> int:
    """Send a POST's headers and none of its body: the status the server answers
    with while the body has still to come (a server that read it first would hang
    until the socket's bound fails the test)."""
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=BOUND) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed without a reply: {reply!r}"
            reply += chunk
    return int(reply.split(b" ", 2)[1])


# -- a page on another site, and DNS rebinding --------------------------------------------------


def test_a_form_from_another_site_starts_no_run(site: Site) -> None:
    server = site.local
    before = runs_of(server)
    for path in ("/run", "/runs"):
        reply = httpx.post(f"{server.url}{path}", content=b"n=3", headers=FORM, timeout=BOUND)
        error_of(reply, 403, "cross_origin")
        # JSON from a foreign page, or marked cross-site by the browser: refused too.
        evil_json = {"Origin": EVIL}
        error_of(
            httpx.post(f"{server.url}{path}", json={"n": 3}, headers=evil_json), 403, "cross_origin"
        )
        cross = {"Sec-Fetch-Site": "cross-site"}
        error_of(
            httpx.post(f"{server.url}{path}", json={"n": 3}, headers=cross), 403, "cross_origin"
        )
        # A text/plain body (what a no-cors fetch sends) without an Origin: not JSON.
        plain = {"Content-Type": "text/plain"}
        reply = httpx.post(f"{server.url}{path}", content=b'{"n": 3}', headers=plain)
        error_of(reply, 415, "unsupported_media_type")
    assert runs_of(server) == before
    # The same call from a program (JSON, no Origin) is served: the local admin.
    ok = httpx.post(f"{server.url}/run", json={"n": 3}, timeout=BOUND)
    assert ok.status_code == 200, ok.text
    assert runs_of(server) == before + 1


def test_a_foreign_host_name_is_refused(site: Site) -> None:
    for server in (site.local, site.wide):
        rebound = {"Host": f"evil.example:{server.port}"}
        error_of(httpx.get(f"{server.url}/ping", headers=rebound), 400, "bad_host")
        before = runs_of(server)
        reply = httpx.post(f"{server.url}/runs", json={"n": 1}, headers=rebound)
        error_of(reply, 400, "bad_host")
        assert runs_of(server) == before
    # A name given with --allowed-host is this server's.
    named = {"Host": f"keel.example:{site.wide.port}"}
    assert httpx.get(f"{site.wide.url}/health", headers=named).status_code == 200


# -- beyond loopback: tokens and roles ----------------------------------------------------------


def test_beyond_loopback_anonymous_callers_get_401(site: Site) -> None:
    server = site.wide
    before = runs_of(server)
    for path in ("/run", "/runs"):
        reply = httpx.post(f"{server.url}{path}", json={"n": 2}, timeout=BOUND)
        error_of(reply, 401, "unauthenticated")
        assert reply.headers["www-authenticate"] == "Bearer"
    error_of(httpx.get(f"{server.url}/runs/nope"), 401, "unauthenticated")
    bad = bearer("keel_not-a-token")
    error_of(httpx.post(f"{server.url}/run", json={"n": 2}, headers=bad), 401, "unauthenticated")
    # Probes stay open.
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert httpx.get(f"{server.url}/health").json()["workflow"] == "pipeline"
    # The token is asked for before the body: the 401 comes while the body is unsent.
    assert (
        headers_only(
            server, "/runs", {"Content-Type": "application/json", "Content-Length": "1000"}
        )
        == 401
    )
    assert runs_of(server) == before


def test_beyond_loopback_tokens_need_their_role(site: Site) -> None:
    server, keys = site.wide, site.keys
    before = runs_of(server)
    viewer = bearer(keys["viewer"])
    # Starting recorded runs writes the store: operator or more.
    for path in ("/run", "/runs"):
        reply = httpx.post(f"{server.url}{path}", json={"n": 2}, headers=viewer, timeout=BOUND)
        error_of(reply, 403, "forbidden")
    assert runs_of(server) == before
    ran = httpx.post(
        f"{server.url}/run", json={"n": 2}, headers=bearer(keys["operator"]), timeout=BOUND
    )
    assert ran.status_code == 200, ran.text
    assert ran.json()["result"]["squares"] == [0, 1]
    queued = httpx.post(
        f"{server.url}/runs", json={"n": 3}, headers=bearer(keys["admin"]), timeout=BOUND
    )
    assert queued.status_code == 202, queued.text
    run_id = queued.json()["run_id"]

    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = httpx.get(f"{server.url}/runs/{run_id}", headers=viewer).json()
        return body if body["status"] == "SUCCEEDED" else None

    assert wait_until(done, "the queued run")["result"]["squares"] == [0, 1, 4]
    assert runs_of(server) == before + 2


# -- bodies -------------------------------------------------------------------------------------


def test_oversized_bodies_get_413_before_they_are_parsed(site: Site) -> None:
    server = site.local
    before = runs_of(server)
    # Declared too large: refused on its headers alone, the body never sent.
    declared = {"Content-Type": "application/json", "Content-Length": str(CAP * 1000)}
    assert headers_only(server, "/runs", declared) == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams
        for _ in range(8):
            yield b"{" * 1000  # not JSON: a parser would say 400, the cap says 413 first

    reply = httpx.post(
        f"{server.url}/runs",
        content=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=BOUND,
    )
    error = error_of(reply, 413, "too_large")
    assert error["details"]["limit"] == CAP
    deep = "[" * 200 + "]" * 200
    reply = httpx.post(
        f"{server.url}/run",
        content=json.dumps({"n": 1, "x": json.loads(deep)}),
        headers={"Content-Type": "application/json"},
    )
    error_of(reply, 400, "json_too_deep")
    assert runs_of(server) == before


# -- what GET /runs/{id} answers ----------------------------------------------------------------


def test_runs_of_other_workflows_are_not_shown(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    server = site.local
    for key in ("KEEL_HOME", "KEEL_DB_URL", "KEEL_ARTIFACTS"):
        monkeypatch.setenv(key, server.env[key])
    other = keel.run(server_flows.arith, x=2, y=3)
    assert other.status == "SUCCEEDED"
    error_of(httpx.get(f"{server.url}/runs/{other.id}"), 404, "run_not_found")
    own = httpx.post(f"{server.url}/run", json={"n": 1}, timeout=BOUND).json()["run_id"]
    reply = httpx.get(f"{server.url}/runs/{own}")
    assert reply.status_code == 200 and reply.json()["status"] == "SUCCEEDED"


# -- starting: not beyond loopback without a token ----------------------------------------------


def test_keel_serve_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    env = _env(tmp_path, f"sqlite:///{tmp_path / 'keel.db'}")
    done = subprocess.run(
        [sys.executable, "-m", "keel", "serve", TARGET, "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=BOUND,
    )
    assert done.returncode == 2, done.stderr
    assert "refusing to listen on 0.0.0.0" in done.stderr
    assert "--insecure-no-auth" in done.stderr
    from keel.store import deployments

    assert deployments.list_deployments(_store(env), include_stopped=True) == []


def test_keel_serve_insecure_no_auth_serves_anyone_and_warns(
    backend: str, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ServingError, match="refusing to listen"):
        keel.serve(TARGET, host="0.0.0.0", port=0, background=True)
    with keel.serve(
        TARGET, host="0.0.0.0", port=0, background=True, insecure_no_auth=True
    ) as handle:
        assert "WARNING: --insecure-no-auth" in capfd.readouterr().err
        port = handle.url.rsplit(":", 1)[1]
        reply = httpx.post(f"http://127.0.0.1:{port}/run", json={"n": 2}, timeout=BOUND)
        assert reply.status_code == 200, reply.text
        # Once a token exists, even this server asks for it.
        key = auth.create_token(open_store(), "late", "operator")
        again = httpx.post(f"http://127.0.0.1:{port}/run", json={"n": 2}, timeout=BOUND)
        error_of(again, 401, "unauthenticated")
        with_key = httpx.post(
            f"http://127.0.0.1:{port}/run", json={"n": 2}, headers=bearer(key), timeout=BOUND
        )
        assert with_key.status_code == 200, with_key.text


# -- the model endpoint -------------------------------------------------------------------------


def test_the_model_endpoint_takes_json_or_csv_from_its_callers_only(backend: str) -> None:
    keel.register_model("offset", Offset(1.0))
    key = auth.create_token(open_store(), "reader", "viewer")
    with keel.serve("models:/offset/1", host="0.0.0.0", port=0, background=True) as handle:
        url = f"http://127.0.0.1:{handle.url.rsplit(':', 1)[1]}"
        viewer = bearer(key)
        body = {"inputs": [[1.0], [2.0]]}
        error_of(httpx.post(f"{url}/invocations", json=body), 401, "UNAUTHENTICATED")
        error_of(httpx.get(f"{url}/metrics"), 401, "UNAUTHENTICATED")
        assert httpx.get(f"{url}/ping").status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        reply = httpx.post(f"{url}/invocations", json=body, headers=viewer, timeout=BOUND)
        assert reply.json() == {"predictions": [2.0, 3.0]}, reply.text
        csv = {**viewer, "Content-Type": "text/csv"}
        reply = httpx.post(f"{url}/invocations", content=b"x\n1.0\n", headers=csv, timeout=BOUND)
        assert reply.json() == {"predictions": [2.0]}, reply.text
        form = {**viewer, **FORM}
        reply = httpx.post(f"{url}/invocations", content=b"x=1", headers=form)
        error_of(reply, 403, "CROSS_ORIGIN")
        plain = {**viewer, "Content-Type": "text/plain"}
        reply = httpx.post(f"{url}/invocations", content=b"x\n1.0\n", headers=plain)
        error_of(reply, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert httpx.get(f"{url}/metrics", headers=viewer).status_code == 200


def test_a_loaded_model_answers_its_callers_through_a_store_outage(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard asks the store who may call; while the store cannot be reached, a
    server open to anonymous callers stays open (no token can appear meanwhile) and a
    token checked lately is still honoured, so predictions go on."""
    from flows import serving_models
    from server_support import Proxy

    url = sa.engine.make_url(pg_url)
    proxy = Proxy(url.port or 5432)
    monkeypatch.setenv("KEEL_DB_URL", url.set(port=proxy.port).render_as_string(False))
    keel.register_model("steady", serving_models.OneAtATime())
    body = {"inputs": [[1.0, 2.0]]}
    with keel.serve("models:/steady/1", port=0, background=True) as server:
        invocations = f"{server.url}/invocations"
        assert httpx.post(invocations, json=body, timeout=60).status_code == 200
        proxy.cut()
        try:
            reply = httpx.post(invocations, json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"predictions": [3.0]}
        finally:
            proxy.restore()
        token = auth.create_token(open_store(), "caller", "viewer")
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.post(invocations, json=body, timeout=60).status_code == 401
        assert httpx.post(invocations, json=body, headers=headers, timeout=60).status_code == 200
        proxy.cut()
        try:
            reply = httpx.post(invocations, json=body, headers=headers, timeout=60)
            assert reply.status_code == 200, reply.text
            anonymous = httpx.post(invocations, json=body, timeout=60)
            assert anonymous.status_code in (401, 503), anonymous.text
        finally:
            proxy.restore()
    proxy.cut()
