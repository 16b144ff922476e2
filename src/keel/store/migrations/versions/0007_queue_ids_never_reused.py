"""SQLite: queue row ids are never handed out again.

Without AUTOINCREMENT, SQLite gives a new row the largest id + 1, so once the
newest row is collected its id comes back. Claims and leases name rows by id; a
reused id could let a late report of an old attempt land on a new one.
PostgreSQL sequences never reuse values, so nothing changes there.

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _recreate_queue(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table(
        "keel_queue", recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
    ):
        pass


def upgrade() -> None:
    _recreate_queue(True)


def downgrade() -> None:
    _recreate_queue(False)
