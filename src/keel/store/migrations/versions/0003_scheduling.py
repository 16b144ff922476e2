"""Scheduling: the work queue, workers, pools, signals, schedules and ticks, triggers.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_RUN_COLUMNS = ("queue", "priority", "wake_at", "schedule", "logical_date", "trigger_name")


def upgrade() -> None:
    with op.batch_alter_table("keel_runs") as batch:
        batch.add_column(sa.Column("queue", sa.String(100)))
        batch.add_column(sa.Column("priority", sa.Integer))
        batch.add_column(sa.Column("wake_at", sa.Float))
        batch.add_column(sa.Column("schedule", sa.String(200)))
        batch.add_column(sa.Column("logical_date", sa.Float))
        batch.add_column(sa.Column("trigger_name", sa.String(200)))

    # `keel cache explain` looks for earlier cache entries of the same task.
    op.create_index("ix_keel_cache_task", "keel_cache", ["task", "created_at"])

    op.create_table(
        "keel_queue",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dedupe", sa.String(250), nullable=False, unique=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer),
        sa.Column("attempt", sa.Integer),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("pool", sa.String(100)),
        sa.Column("not_before", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("claimed_by", sa.String(100)),
        sa.Column("lease_until", sa.Float),
        sa.Column("claims", sa.Integer, nullable=False, server_default="0"),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("outcome", sa.LargeBinary),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("done_at", sa.Float),
    )
    op.create_index(
        "ix_keel_queue_claim", "keel_queue", ["status", "queue", "priority", "not_before"]
    )
    op.create_index("ix_keel_queue_run", "keel_queue", ["run_id"])
    op.create_table(
        "keel_workers",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("queues", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_pools",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("slots", sa.Integer, nullable=False),
    )
    op.create_table(
        "keel_signals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("payload", sa.Text),
        sa.Column("sent_at", sa.Float, nullable=False),
        sa.Column("consumed_seq", sa.Integer),
    )
    op.create_index("ix_keel_signals_run_name", "keel_signals", ["run_id", "name", "id"])
    op.create_table(
        "keel_schedules",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("workflow", sa.String(200), nullable=False),
        sa.Column("entrypoint", sa.Text),
        sa.Column("cron", sa.String(100)),
        sa.Column("interval_seconds", sa.Float),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("params", sa.Text),
        sa.Column("catchup", sa.String(8), nullable=False, server_default="latest"),
        sa.Column("overlap", sa.String(16), nullable=False, server_default="queue"),
        sa.Column("max_active_runs", sa.Integer),
        sa.Column("queue", sa.String(100), nullable=False, server_default="default"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("start_at", sa.Float, nullable=False),
        sa.Column("end_at", sa.Float),
        sa.Column("next_tick", sa.Float),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_ticks",
        sa.Column("schedule", sa.String(200), primary_key=True),
        sa.Column("logical_date", sa.Float, primary_key=True),
        sa.Column("run_id", sa.String(64)),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_triggers",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("config", sa.Text),
        sa.Column("workflow", sa.String(200), nullable=False),
        sa.Column("entrypoint", sa.Text),
        sa.Column("params", sa.Text),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("state", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_trigger_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("trigger", sa.String(200), nullable=False),
        sa.Column("fired_at", sa.Float, nullable=False),
        sa.Column("cause", sa.Text),
        sa.Column("run_id", sa.String(64)),
    )
    op.create_index(
        "ix_keel_trigger_events_trigger", "keel_trigger_events", ["trigger", "fired_at"]
    )


def downgrade() -> None:
    for table in (
        "keel_trigger_events",
        "keel_triggers",
        "keel_ticks",
        "keel_schedules",
        "keel_signals",
        "keel_pools",
        "keel_workers",
        "keel_queue",
    ):
        op.drop_table(table)
    op.drop_index("ix_keel_cache_task", "keel_cache")
    with op.batch_alter_table("keel_runs") as batch:
        for column in _RUN_COLUMNS:
            batch.drop_column(column)
