"""Where keel keeps things. Read from the environment once per store opening.

- `KEEL_HOME` (default `~/.keel`): the folder for the embedded store.
- `KEEL_DB_URL` (default `sqlite:///$KEEL_HOME/keel.db`): any SQLAlchemy URL;
  PostgreSQL as `postgresql+psycopg://user@host/db`.
- `KEEL_ARTIFACTS` (default `$KEEL_HOME/artifacts`): a folder or any fsspec URL.
- `KEEL_INLINE_LIMIT` (default 16384): values whose serialized form is at most
  this many bytes are kept in the metadata row instead of the artifact store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keel.errors import ConfigError

DEFAULT_INLINE_LIMIT = 16 * 1024


@dataclass(frozen=True, slots=True)
class StoreConfig:
    db_url: str
    artifacts_url: str
    inline_limit: int = DEFAULT_INLINE_LIMIT

    @classmethod
    def from_env(cls, db_url: str | None = None, artifacts_url: str | None = None) -> StoreConfig:
        home = Path(os.environ.get("KEEL_HOME") or Path.home() / ".keel").expanduser()
        db = db_url or os.environ.get("KEEL_DB_URL") or f"sqlite:///{home / 'keel.db'}"
        artifacts = artifacts_url or os.environ.get("KEEL_ARTIFACTS") or str(home / "artifacts")
        raw_limit = os.environ.get("KEEL_INLINE_LIMIT", str(DEFAULT_INLINE_LIMIT))
        try:
            limit = int(raw_limit)
        except ValueError:
            raise ConfigError(
                f"KEEL_INLINE_LIMIT must be a whole number of bytes, got {raw_limit!r}",
                hint="Unset it or set it to e.g. 16384",
            ) from None
        return cls(db_url=db, artifacts_url=artifacts, inline_limit=max(0, limit))
