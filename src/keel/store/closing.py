"""Closing a cancelled run: what was still open under it ends with it.

A run is cancelled by its own process (Ctrl-C, SIGTERM, `keel cancel` while it is
alive) or by `keel cancel` when no process runs it. Either way its child runs, their
steps and its own steps that had not ended are recorded as CANCELLED (a resume runs
them again), and its work items leave the queue, so no worker starts them later.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from keel.store.metadata import MetadataStore
from keel.store.schema import queue_items, runs, steps

_OPEN = ("RUNNING", "PENDING")
_CHUNK = 500  # ids per statement, well under any database's bound-parameter limit


def run_tree(conn: sa.Connection, run_id: str) -> list[str]:
    """The run and its child runs at every depth, level by level through the
    parent_id index (child ids extend their parent's, but a LIKE on the prefix
    would scan the table on PostgreSQL)."""
    found = [run_id]
    level = [run_id]
    while level:
        below: list[str] = []
        for start in range(0, len(level), _CHUNK):
            chunk = level[start : start + _CHUNK]
            below += conn.execute(sa.select(runs.c.id).where(runs.c.parent_id.in_(chunk))).scalars()
        found += below
        level = below
    return found


def close_run(store: MetadataStore, run_id: str, message: str) -> None:
    """Record the run's open child runs and open steps (its own and theirs) as
    CANCELLED with `message`, and remove the tree's work items from the queue; all in
    one transaction. The run's own row is ended too if it is still open."""
    now = time.time()
    ended = {"status": "CANCELLED", "ended_at": now, "error_type": "Cancelled"}
    with store.engine.begin() as conn:
        tree = run_tree(conn, run_id)
        for start in range(0, len(tree), _CHUNK):
            chunk = tree[start : start + _CHUNK]
            conn.execute(
                runs.update()
                .where(runs.c.id.in_(chunk), runs.c.status.in_(_OPEN))
                .values(**ended, error_message=message, wake_at=None)
            )
            conn.execute(
                steps.update()
                .where(steps.c.run_id.in_(chunk), steps.c.status.in_(_OPEN))
                .values(**ended, error_message=message)
            )
            conn.execute(queue_items.delete().where(queue_items.c.run_id.in_(chunk)))
