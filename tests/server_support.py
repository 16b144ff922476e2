"""What the REST API tests share: an app on the test's store with the test workflows,
clients with tokens, bounded waits, and a real uvicorn server on a free port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.testclient import TestClient

from flows import server_flows as flows
from keel.server import auth
from keel.server.app import create_app
from keel.server.guard import GateConfig
from keel.server.workflows import WorkflowRegistry
from keel.store.metadata import MetadataStore, open_store

WORKFLOWS = (
    flows.arith,
    flows.typed,
    flows.gated,
    flows.tracked,
    flows.failing,
    flows.waits_for_signal,
    flows.signalled,
)
# Generous bounds for things that happen in the background: reaching one is a failure,
# never a measurement.
DEADLINE = 120.0


# Starlette's TestClient calls the app as `testserver`; a real server is on 127.0.0.1.
GATE = GateConfig(allowed_hosts=("testserver",))


def make_app(store: MetadataStore | None = None, dispatch: str = "server") -> FastAPI:
    app = create_app(store or open_store(), GATE)
    app.state.workflows = WorkflowRegistry(WORKFLOWS)
    app.state.dispatch = dispatch
    app.state.sse_poll_seconds = 0.05
    return app


def stop(app: FastAPI) -> None:
    """Stop the app's run threads (a test's store is dropped after it)."""
    runner = getattr(app.state, "runner", None)
    if runner is not None:
        runner.stop(wait=DEADLINE)


def client(app: FastAPI, token: str | None = None) -> TestClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return TestClient(app, headers=headers, raise_server_exceptions=False)


def tokens(store: MetadataStore) -> dict[str, str]:
    """One token per role, named after it."""
    return {role: auth.create_token(store, role, role) for role in auth.ROLES}


def wait_until(check: Callable[[], Any], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def wait_status(api: TestClient | httpx.Client, run_id: str, *statuses: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run: dict[str, Any] = api.get(f"/api/v1/runs/{run_id}").json()
        return run if run.get("status") in statuses else None

    return wait_until(check, f"run {run_id} to be {'/'.join(statuses)}")  # type: ignore[no-any-return]


def launch(api: TestClient | httpx.Client, workflow: str, **body: Any) -> dict[str, Any]:
    reply = api.post(f"/api/v1/workflows/{workflow}/runs", json=body)
    assert reply.status_code == 202, reply.text
    return reply.json()["run"]  # type: ignore[no-any-return]


def assert_error(reply: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The reply is a JSON error of that status and shape, without a traceback."""
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in reply.text
    return body["error"]  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """The app on a real uvicorn, on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "uvicorn to start", 30)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Proxy:
    """A TCP proxy to PostgreSQL that can be cut (every connection dropped, new ones
    refused) and restored: the database seen as unreachable by this server only."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = free_port()
        self.open: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            self.open += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        assert self.listener is not None
        # shutdown wakes the thread blocked in accept(); close alone would not.
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for s in self.open:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.open.clear()
