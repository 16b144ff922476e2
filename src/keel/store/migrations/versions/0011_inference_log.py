"""The inference log of `keel serve --log-requests`, and each deployment's traffic
(request and error totals, rate and latency percentiles written with its heartbeat).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_STATS = ("requests", "errors", "rate", "p50_ms", "p95_ms")


def upgrade() -> None:
    with op.batch_alter_table("keel_deployments") as batch:
        batch.add_column(sa.Column("requests", sa.BigInteger))
        batch.add_column(sa.Column("errors", sa.BigInteger))
        batch.add_column(sa.Column("rate", sa.Float))
        batch.add_column(sa.Column("p50_ms", sa.Float))
        batch.add_column(sa.Column("p95_ms", sa.Float))
    op.create_table(
        "keel_inference_log",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("model", sa.String(250), nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("deployment_id", sa.String(64)),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("inputs", sa.Text),
        sa.Column("predictions", sa.Text),
        sa.Column("truncated", sa.Boolean, nullable=False),
    )
    op.create_index(
        "ix_keel_inference_log_version", "keel_inference_log", ["model", "version", "time"]
    )


def downgrade() -> None:
    op.drop_index("ix_keel_inference_log_version", "keel_inference_log")
    op.drop_table("keel_inference_log")
    with op.batch_alter_table("keel_deployments") as batch:
        for name in _STATS:
            batch.drop_column(name)
