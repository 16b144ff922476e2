"""Claims read the queue in index order instead of sorting its whole backlog.

A claim wants the most urgent, then oldest, due items of a queue. The old index
(status, queue, priority, not_before) could not give that order (priority
descending, id ascending), so each claim sorted every queued item: about 40-60 ms
per claim with 30,000 queued. The new index holds exactly that order; expired
leases are found through their own small index.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_keel_queue_pick",
        "keel_queue",
        ["status", "queue", sa.text("priority DESC"), "id"],
    )
    op.create_index("ix_keel_queue_lease", "keel_queue", ["status", "lease_until"])
    op.drop_index("ix_keel_queue_claim", "keel_queue")


def downgrade() -> None:
    op.create_index(
        "ix_keel_queue_claim", "keel_queue", ["status", "queue", "priority", "not_before"]
    )
    op.drop_index("ix_keel_queue_lease", "keel_queue")
    op.drop_index("ix_keel_queue_pick", "keel_queue")
