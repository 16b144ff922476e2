"""Shared fixtures. Every test gets its own store; `backend` runs a test on SQLite
and on PostgreSQL (the machine's server, one fresh schema per test)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.testclient import TestClient

PG_URL = os.environ.get("KEEL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    # In CI a test may not skip (an integration test that skips proves nothing):
    # the skip is turned into a failure that says why.
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which is not allowed: {report.longrepr}"


def _pg_available() -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:
        return str(exc).splitlines()[0]


@pytest.fixture(scope="session")
def pg_reason() -> str | None:
    return _pg_available()


@contextmanager
def fresh_pg_schema(reason: str | None) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards with the
    stores opened on it. `reason` (from `pg_reason`) says why PostgreSQL is unreachable:
    then the test fails in CI and is skipped elsewhere."""
    if reason is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {reason}")
        pytest.skip(f"PostgreSQL unreachable: {reason}")
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        from keel.store import metadata as md

        for key, store in list(md._stores.items()):
            if schema in key[0]:
                store.dispose()
                del md._stores[key]
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def pg_url(pg_reason: str | None) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    with fresh_pg_schema(pg_reason) as url:
        yield url


@pytest.fixture(autouse=True)
def keel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test touches ~/.keel: each gets its own KEEL_HOME (SQLite + artifacts)."""
    home = tmp_path / "keel-home"
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.delenv("KEEL_DB_URL", raising=False)
    monkeypatch.delenv("KEEL_ARTIFACTS", raising=False)
    monkeypatch.delenv("KEEL_EXECUTOR", raising=False)
    return home


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per metadata store; sets KEEL_DB_URL accordingly."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        monkeypatch.setenv("KEEL_DB_URL", url)
    return str(request.param)


@pytest.fixture
def app(backend: str) -> Iterator[FastAPI]:
    """The server app (tests/server_support.py) on this test's store; its run threads
    are stopped afterwards."""
    from server_support import make_app, stop

    made = make_app()
    yield made
    stop(made)


@pytest.fixture
def api(app: FastAPI) -> TestClient:
    """An anonymous client of `app`."""
    from server_support import client

    return client(app)
