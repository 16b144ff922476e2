"""Where keel keeps things. Read from the environment once per store opening.

- `KEEL_HOME` (default `~/.keel`): the folder for the embedded store.
- `KEEL_DB_URL` (default `sqlite:///$KEEL_HOME/keel.db`): any SQLAlchemy URL;
  PostgreSQL as `postgresql+psycopg://user@host/db`.
- `KEEL_ARTIFACTS` (default `$KEEL_HOME/artifacts`): a folder or any fsspec URL.
- `KEEL_INLINE_LIMIT` (default 16384): values whose serialized form is at most
  this many bytes are kept in the metadata row instead of the artifact store.
- `KEEL_FLUSH_INTERVAL` (default 0.01 s): how long recorded events (step records,
  metrics, params) gather before they are committed together. A crash loses at
  most what was recorded during the last interval (steps then run again).
- `KEEL_LIVE_LOG_INTERVAL` (default 1 s, 0 turns it off): how often what a running
  step has printed so far is recorded (executors/live_logs.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keel.errors import ConfigError

DEFAULT_INLINE_LIMIT = 16 * 1024
DEFAULT_FLUSH_INTERVAL = 0.01
DEFAULT_LIVE_LOG_INTERVAL = 1.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    db_url: str
    artifacts_url: str
    inline_limit: int = DEFAULT_INLINE_LIMIT
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    live_log_interval: float = DEFAULT_LIVE_LOG_INTERVAL

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
        interval = env_seconds("KEEL_FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL, high=60)
        live = env_seconds("KEEL_LIVE_LOG_INTERVAL", DEFAULT_LIVE_LOG_INTERVAL, high=3600)
        return cls(
            db_url=db,
            artifacts_url=artifacts,
            inline_limit=max(0, limit),
            flush_interval=interval,
            live_log_interval=live,
        )


def env_seconds(name: str, default: float, *, high: float) -> float:
    """A number of seconds from the environment, between 0 and `high`."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
        if not 0 <= value <= high:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{name} must be a number of seconds between 0 and {high:g}, got {raw!r}",
            hint=f"Unset it or set it to e.g. {default:g}",
        ) from None
    return value
