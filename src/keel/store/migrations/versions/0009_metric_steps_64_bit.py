"""Metric steps are 64-bit integers on PostgreSQL too.

`keel_metrics.step` and `keel_latest_metrics.step` were INTEGER: 64-bit on SQLite,
32-bit on PostgreSQL, so a step past 2**31 (a step counted in samples, or a time in
milliseconds, as MLflow clients send) was recorded on one database and refused by
the other. Both now hold what MLflow's own store holds: a BIGINT. SQLite's INTEGER
already is one, and its tables are left as they are.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TABLES = ("keel_metrics", "keel_latest_metrics")


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.alter_column(table, "step", type_=sa.BigInteger, existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.alter_column(table, "step", type_=sa.Integer, existing_nullable=False)
