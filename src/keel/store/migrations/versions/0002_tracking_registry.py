"""Tracking (experiments, params, metrics, tags, logged artifacts) and the model registry.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("keel_runs") as batch:
        batch.add_column(sa.Column("experiment_id", sa.Integer))
        batch.add_column(sa.Column("run_name", sa.String(250)))
        batch.add_column(
            sa.Column("kind", sa.String(16), nullable=False, server_default="workflow")
        )
        batch.add_column(sa.Column("user", sa.String(100)))
        batch.add_column(
            sa.Column("lifecycle_stage", sa.String(16), nullable=False, server_default="active")
        )
    op.create_index("ix_keel_runs_experiment", "keel_runs", ["experiment_id", "created_at"])

    op.create_table(
        "keel_experiments",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(250), nullable=False, unique=True),
        sa.Column("lifecycle_stage", sa.String(16), nullable=False, server_default="active"),
        sa.Column("artifact_location", sa.Text),
        sa.Column("tags", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_params",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "keel_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("is_nan", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("timestamp", sa.Float, nullable=False),
    )
    op.create_index("ix_keel_metrics_run_key", "keel_metrics", ["run_id", "seq", "key", "step"])
    op.create_table(
        "keel_latest_metrics",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("value", sa.Float),
        sa.Column("is_nan", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("step", sa.Integer, nullable=False, server_default="0"),
        sa.Column("timestamp", sa.Float, nullable=False),
    )
    op.create_index("ix_keel_latest_metrics_key_value", "keel_latest_metrics", ["key", "value"])
    op.create_table(
        "keel_tags",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("key", sa.String(250), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "keel_logged_artifacts",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("path", sa.String(1000), primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_models",
        sa.Column("name", sa.String(250), primary_key=True),
        sa.Column("description", sa.Text),
        sa.Column("tags", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_model_versions",
        sa.Column("name", sa.String(250), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("flavor", sa.String(40), nullable=False),
        sa.Column("source_hash", sa.String(64)),
        sa.Column("source_uri", sa.Text),
        sa.Column("signature", sa.Text),
        sa.Column("meta", sa.Text),
        sa.Column("run_id", sa.String(64)),
        sa.Column("seq", sa.Integer),
        sa.Column("description", sa.Text),
        sa.Column("tags", sa.Text),
        sa.Column("status", sa.String(16), nullable=False, server_default="READY"),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("created_by", sa.String(100)),
    )
    op.create_table(
        "keel_model_aliases",
        sa.Column("name", sa.String(250), primary_key=True),
        sa.Column("alias", sa.String(250), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.String(100)),
    )
    op.create_table(
        "keel_registry_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("alias", sa.String(250)),
        sa.Column("previous_version", sa.Integer),
        sa.Column("detail", sa.Text),
        sa.Column("actor", sa.String(100)),
        sa.Column("at", sa.Float, nullable=False),
    )
    op.create_index("ix_keel_registry_events_name", "keel_registry_events", ["name", "at"])


def downgrade() -> None:
    for table in (
        "keel_registry_events",
        "keel_model_aliases",
        "keel_model_versions",
        "keel_models",
        "keel_logged_artifacts",
        "keel_tags",
        "keel_latest_metrics",
        "keel_metrics",
        "keel_params",
        "keel_experiments",
    ):
        op.drop_table(table)
    op.drop_index("ix_keel_runs_experiment", "keel_runs")
    with op.batch_alter_table("keel_runs") as batch:
        for column in ("lifecycle_stage", "user", "kind", "run_name", "experiment_id"):
            batch.drop_column(column)
