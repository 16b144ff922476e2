"""The Alembic migrations: a fresh database built by them is the schema the code
declares, and upgrading an older store keeps what it holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from keel.store import queue, schema
from keel.store.metadata import open_store
from keel.store.migrations.env_names import VERSION_TABLE

MIGRATIONS = Path(schema.__file__).parent / "migrations"


def upgrade(engine: sa.Engine, revision: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def test_migrations_build_the_declared_schema(backend: str) -> None:
    store = open_store()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = compare_metadata(context, schema.metadata)
    assert diff == [], diff


QUEUED_STEP = {
    "kind": "step",
    "run_id": "r1",
    "seq": 0,
    "attempt": 1,
    "queue": "default",
    "priority": 0,
    "not_before": 0.0,
    "status": "queued",
    "claims": 0,
    "payload": b"call",
    "created_at": 0.0,
}


def delete_newest_then_insert(conn: sa.Connection, dedupe: str) -> int:
    """Delete the newest queue row, insert another; the new row's id."""
    items = schema.queue_items
    conn.execute(
        items.delete().where(items.c.id == sa.select(sa.func.max(items.c.id)).scalar_subquery())
    )
    conn.execute(items.insert(), [{**QUEUED_STEP, "dedupe": dedupe}])
    return int(conn.execute(sa.select(items.c.id).where(items.c.dedupe == dedupe)).scalar_one())


def test_upgrading_to_0007_keeps_queued_items_and_stops_reusing_ids(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.execute(
            schema.queue_items.insert(),
            [{**QUEUED_STEP, "dedupe": f"step:r1:{seq}:1", "seq": seq} for seq in (0, 1)],
        )
        # Before 0007, SQLite hands the id of a deleted newest row out again.
        assert delete_newest_then_insert(conn, "step:r1:2:1") == 2
    upgrade(engine, "0007")
    with engine.begin() as conn:
        kept = conn.execute(
            sa.select(schema.queue_items.c.id, schema.queue_items.c.payload).order_by("id")
        ).all()
        assert [tuple(r) for r in kept] == [(1, b"call"), (2, b"call")]
        assert delete_newest_then_insert(conn, "step:r1:3:1") == 3
    engine.dispose()


def step_item(run_id: str, seq: int) -> queue.StepItem:
    return queue.StepItem(run_id, seq, 1, "default", 0, None, b"x")


def test_collected_queue_ids_are_not_handed_out_again(backend: str) -> None:
    store = open_store()
    queue.enqueue_steps(store, [step_item("r1", seq) for seq in range(3)])
    claims = [queue.claim(store, "w", ["default"], lease_seconds=30) for _ in range(3)]
    ids = []
    for claim in claims:
        assert claim is not None
        ids.append(claim.id)
        assert queue.complete(store, claim.id, "w", b"outcome")
    keys = [queue.step_key("r1", seq, 1) for seq in range(3)]
    assert sorted(queue.finished_outcomes(store, keys)) == [(k, b"outcome") for k in keys]
    assert queue.finished_outcomes(store, keys) == []  # collected once
    queue.enqueue_steps(store, [step_item("r1", 3)])
    again = queue.claim(store, "w", ["default"], lease_seconds=30)
    assert again is not None
    assert again.id not in ids


def test_processes_opening_a_fresh_store_at_once_all_succeed(backend: str) -> None:
    """A worker fleet starting on a new database: one process migrates, the others
    wait for it, and every one of them opens the store."""
    code = "from keel.store.metadata import open_store; open_store(); print('opened')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "opened"
    with open_store().engine.connect() as conn:
        revision = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    assert revision == schema.SCHEMA_REVISION
