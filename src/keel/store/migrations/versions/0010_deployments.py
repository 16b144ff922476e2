"""Deployments: the model and workflow servers `keel serve` runs, with heartbeats.

Revision ID: 0010
Revises: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keel_deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("model", sa.String(250)),
        sa.Column("version", sa.Integer),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("workers", sa.Integer, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("machine", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("stopped_at", sa.Float),
    )
    op.create_index("ix_keel_deployments_model", "keel_deployments", ["model", "version"])


def downgrade() -> None:
    op.drop_index("ix_keel_deployments_model", "keel_deployments")
    op.drop_table("keel_deployments")
