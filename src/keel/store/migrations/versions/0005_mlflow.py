"""MLflow compatibility: logged models (MLflow 3) and their files, runs' inputs.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keel_logged_models",
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("experiment_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(250), nullable=False),
        sa.Column("source_run_id", sa.String(64)),
        sa.Column("model_type", sa.String(100)),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("status_message", sa.Text),
        sa.Column("tags", sa.Text),
        sa.Column("params", sa.Text),
        sa.Column("lifecycle_stage", sa.String(16), nullable=False, server_default="active"),
        sa.Column("created_by", sa.String(200)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index(
        "ix_keel_logged_models_experiment", "keel_logged_models", ["experiment_id", "name"]
    )
    op.create_index("ix_keel_logged_models_run", "keel_logged_models", ["source_run_id"])
    op.create_table(
        "keel_logged_model_files",
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("path", sa.String(1000), primary_key=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "keel_run_inputs",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("key", sa.String(600), primary_key=True),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("keel_run_inputs")
    op.drop_table("keel_logged_model_files")
    op.drop_table("keel_logged_models")
