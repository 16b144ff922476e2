"""SQL of the inference log: the requests a server sampled (`keel serve --log-requests`).

Rows are written in batches by the server's log thread (`serving/request_log.py`) and
read newest-first in pages (REST) or oldest-first (`keel.inference_log`). Inputs and
predictions are JSON text; either one longer than `MAX_JSON_CHARS` is not stored (the
column is NULL and `truncated` is true), so one huge request cannot bloat the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from keel.store.metadata import MetadataStore
from keel.store.schema import inference_log

MAX_JSON_CHARS = 64 * 1024  # per column of a row: inputs, predictions


def insert_many(store: MetadataStore, rows: Sequence[dict[str, Any]]) -> None:
    """One transaction for the whole batch."""
    if rows:
        with store.engine.begin() as conn:
            conn.execute(inference_log.insert(), list(rows))


def select(
    store: MetadataStore,
    model: str,
    version: int | None = None,
    *,
    since: float | None = None,
    limit: int | None = None,
    newest_first: bool = False,
    before_id: int | None = None,
) -> list[Any]:
    """The model's logged requests (of one version, from `since` on), by id."""
    t = inference_log
    stmt = sa.select(t).where(t.c.model == model)
    if version is not None:
        stmt = stmt.where(t.c.version == version)
    if since is not None:
        stmt = stmt.where(t.c.time >= since)
    if before_id is not None:
        stmt = stmt.where(t.c.id < before_id)
    stmt = stmt.order_by(t.c.id.desc() if newest_first else t.c.id.asc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.engine.connect() as conn:
        return list(conn.execute(stmt))


def count(store: MetadataStore, model: str, version: int | None = None) -> int:
    t = inference_log
    stmt = sa.select(sa.func.count()).select_from(t).where(t.c.model == model)
    if version is not None:
        stmt = stmt.where(t.c.version == version)
    with store.engine.connect() as conn:
        return int(conn.execute(stmt).scalar_one())
