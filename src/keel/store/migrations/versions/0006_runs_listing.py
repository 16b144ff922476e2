"""One index for listing top-level runs newest first and for a run's children.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_keel_runs_parent_created", "keel_runs", ["parent_id", "created_at", "id"])
    op.drop_index("ix_keel_runs_parent", "keel_runs")


def downgrade() -> None:
    op.create_index("ix_keel_runs_parent", "keel_runs", ["parent_id"])
    op.drop_index("ix_keel_runs_parent_created", "keel_runs")
