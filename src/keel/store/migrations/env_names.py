"""Names shared by the Alembic environment and the store (importable without Alembic)."""

VERSION_TABLE = "keel_alembic_version"
