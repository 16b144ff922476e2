"""The real PostgreSQL server restarted mid-run (PostgreSQL only).

While (a) an in-process run executes many steps and (b) a `keel worker` process
executes the queued steps of a run, the machine's PostgreSQL cluster is restarted
(`pg_ctlcluster ... restart`, which drops every connection). Afterwards the runs
complete, nothing stays PENDING or claimed, and the worker still serves new work:
the recorder, the queue executor and the worker reconnect with backoff.

The restart disturbs every other user of the server, so this module is named to
run last in the suite (pytest runs test files in name order; CI runs the suite
sequentially). It needs to be root (or the postgres user) to restart the cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

import keel
from conftest import IN_CI, PG_URL
from flows import worker_flows as flows
from flows.worker_support import (  # reap_processes: an autouse fixture
    InThread,
    WorkerProcess,
    queue_rows,
    read_lines,
    reap_processes,  # noqa: F401
    runs_of,
    step_runs,
    succeeded_seqs,
    wait_until,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    # After the restart the driver's connections that the server killed are dropped by
    # the pool, and psycopg warns when such an object is collected unclosed: a driver
    # detail of the reconnect, not a leak of keel's (warnings are errors in the suite).
    pytest.mark.filterwarnings("ignore:.*was deleted while still open:ResourceWarning"),
]

PG_CONF = Path("/etc/postgresql")


def _cannot_restart() -> str | None:
    if shutil.which("pg_ctlcluster") is None or not PG_CONF.is_dir():
        return "pg_ctlcluster or /etc/postgresql is missing (not a Debian PostgreSQL cluster)"
    if os.geteuid() != 0:
        return "restarting the PostgreSQL cluster needs root"
    try:
        engine = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:
        return f"PostgreSQL unreachable: {str(exc).splitlines()[0]}"
    return None


def restart_postgres() -> None:
    """Restart the cluster (dropping every connection); return when it accepts them again."""
    version = sorted(os.listdir(PG_CONF), key=lambda v: [int(x) for x in v.split(".")])[-1]
    done = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"restart failed: {done.stdout}{done.stderr}"
    deadline = time.monotonic() + 120
    while subprocess.run(["pg_isready", "-q"], check=False).returncode != 0:
        assert time.monotonic() < deadline, "PostgreSQL did not come back within 120 s"
        time.sleep(0.2)


@pytest.fixture
def blip_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Like conftest's `pg_url` (a fresh schema, KEEL_DB_URL set), with an admin
    engine that opens a new connection each time, so it outlives the restart."""
    reason = _cannot_restart()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"the database-blip tests must run in CI: {reason}")
        pytest.skip(reason)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    url = f"{PG_URL}?options=-csearch_path%3D{schema}"
    monkeypatch.setenv("KEEL_DB_URL", url)
    yield url
    from keel.store import metadata as md

    for key, opened in list(md._stores.items()):
        if schema in key[0]:
            opened.dispose()
            del md._stores[key]
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))


def nothing_left_behind() -> None:
    """No run PENDING or RUNNING, no queue item waiting or claimed."""
    stuck = [r for r in keel.Client().runs(limit=None) if r.status in ("PENDING", "RUNNING")]
    assert stuck == [], f"runs left unfinished: {stuck}"
    waiting = [r for r in queue_rows() if r.status != "done"]
    assert waiting == [], f"queue items left: {[(r.dedupe, r.status) for r in waiting]}"


def test_an_in_process_run_survives_a_postgres_restart(
    blip_pg: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = 400
    out = tmp_path / "effects.txt"
    running = InThread(flows.slow_chain, out=str(out), n=n, delay=0.03)
    wait_until("a quarter of the steps to run", lambda: len(read_lines(out)) >= n // 4)
    assert not running.ended()
    restart_postgres()

    handle = running.join()
    assert handle.status == "SUCCEEDED", keel.Client().run(handle.id).error_message
    assert handle.result() == sum(range(n))
    assert succeeded_seqs(handle.id) == set(range(n))
    assert set(step_runs(out)) == set(range(n))
    nothing_left_behind()
    # Steps kept running while the server was down; their records waited and were written.
    retried = [r for r in caplog.records if r.name == "keel.recorder"]
    assert retried, "the recorder never saw the restart (did the run end before it?)"
    assert all("retrying" in r.getMessage() for r in retried), [r.getMessage() for r in retried]


def test_a_worker_and_its_coordinator_survive_a_postgres_restart(
    blip_pg: str, tmp_path: Path
) -> None:
    n = 300
    out = tmp_path / "effects.txt"
    # A short lease: a step whose completion was lost in the restart is claimed again soon.
    worker = WorkerProcess(tmp_path, "worker", flows.STEPS_QUEUE, concurrency=4, lease=5)
    # The body keeps submitting steps to the queue (one every 30 ms) through the restart.
    running = InThread(flows.trickle, out=str(out), n=n, gap=0.03)
    wait_until("a quarter of the steps to run", lambda: len(read_lines(out)) >= n // 4, worker)
    assert not running.ended()
    restart_postgres()

    handle = running.join(worker)
    run_id = runs_of("trickle")[0].id
    assert handle.status == "SUCCEEDED", keel.Client().run(run_id).error_message
    assert handle.result() == sum(i * i for i in range(n))
    assert succeeded_seqs(run_id) == set(range(n))
    nothing_left_behind()

    # The worker is still connected and serving: a new run's steps are taken.
    again = InThread(flows.queued_fanout, out=str(tmp_path / "again.txt"), n=20).join(worker)
    assert again.status == "SUCCEEDED"
    assert worker.terminate() == 0, worker.report()
    nothing_left_behind()


def test_a_foreground_run_following_a_parked_run_survives_a_postgres_restart(
    blip_pg: str,
) -> None:
    from keel.engine.waits import SUSPEND_AFTER

    running = InThread(flows.parked_sleep, seconds=SUSPEND_AFTER + 8)
    wait_until(
        "the run to park",
        lambda: bool(runs_of("parked_sleep")) and runs_of("parked_sleep")[0].status == "PENDING",
    )
    restart_postgres()
    handle = running.join()
    assert handle.status == "SUCCEEDED"
    assert handle.result() == "woke"
    nothing_left_behind()
