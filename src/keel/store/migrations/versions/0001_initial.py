"""The first schema: runs, steps, attempts, logs, artifacts, cache entries.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keel_runs",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("workflow", sa.String(200), nullable=False),
        sa.Column("entrypoint", sa.Text),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("params", sa.Text),
        sa.Column("tags", sa.Text),
        sa.Column("tasks", sa.Text),
        sa.Column("parent_id", sa.String(64)),
        sa.Column("parent_seq", sa.Integer),
        sa.Column("retry_of", sa.String(64)),
        sa.Column("executor", sa.String(40)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("result_serializer", sa.String(40)),
        sa.Column("result_inline", sa.LargeBinary),
        sa.Column("result_ref", sa.String(64)),
        sa.Column("result_type", sa.String(200)),
        sa.Column("error_type", sa.String(200)),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", sa.Text),
        sa.Column("host", sa.String(200)),
        sa.Column("pid", sa.Integer),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_keel_runs_workflow_created", "keel_runs", ["workflow", "created_at"])
    op.create_index("ix_keel_runs_created", "keel_runs", ["created_at"])
    op.create_index("ix_keel_runs_status", "keel_runs", ["status"])
    op.create_index("ix_keel_runs_parent", "keel_runs", ["parent_id"])

    op.create_table(
        "keel_steps",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("deps", sa.Text),
        sa.Column("output_serializer", sa.String(40)),
        sa.Column("output_inline", sa.LargeBinary),
        sa.Column("output_ref", sa.String(64)),
        sa.Column("output_hash", sa.String(64)),
        sa.Column("output_type", sa.String(200)),
        sa.Column("output_size", sa.Integer),
        sa.Column("cache_key", sa.String(64)),
        sa.Column("cache_info", sa.Text),
        sa.Column("cached_from", sa.String(100)),
        sa.Column("child_run_id", sa.String(64)),
        sa.Column("error_type", sa.String(200)),
        sa.Column("error_message", sa.Text),
    )
    op.create_index(
        "ix_keel_steps_output_ref",
        "keel_steps",
        ["output_ref"],
        sqlite_where=sa.text("output_ref IS NOT NULL"),
        postgresql_where=sa.text("output_ref IS NOT NULL"),
    )

    op.create_table(
        "keel_attempts",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("error_type", sa.String(200)),
        sa.Column("error_message", sa.Text),
        sa.Column("traceback", sa.Text),
    )

    op.create_table(
        "keel_logs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("stream", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_keel_logs_run_seq", "keel_logs", ["run_id", "seq", "attempt"])

    op.create_table(
        "keel_artifacts",
        sa.Column("hash", sa.String(64), primary_key=True),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("serializer", sa.String(40), nullable=False),
        sa.Column("type_name", sa.String(200)),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("seq", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
    )

    op.create_table(
        "keel_cache",
        sa.Column("cache_key", sa.String(64), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "keel_cache",
        "keel_artifacts",
        "keel_logs",
        "keel_attempts",
        "keel_steps",
        "keel_runs",
    ):
        op.drop_table(table)
