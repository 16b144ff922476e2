"""Signals sent to runs: kept until a `wait_for_signal` of the run consumes them."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from keel.store.metadata import MetadataStore
from keel.store.schema import signals


def send(store: MetadataStore, run_id: str, name: str, payload: Any) -> int:
    with store.engine.begin() as conn:
        result = conn.execute(
            signals.insert().values(
                run_id=run_id, name=name, payload=json.dumps(payload), sent_at=time.time()
            )
        )
        return int(result.inserted_primary_key[0])  # type: ignore[index]


_MISSING = object()


def consume(store: MetadataStore, run_id: str, name: str, seq: int) -> Any:
    """The payload for the wait at position `seq`: the signal it consumed before (a
    replay), else the oldest unconsumed one, marked consumed by `seq`. Returns
    `MISSING` when there is none yet."""
    with store.engine.begin() as conn:
        mine = conn.execute(
            sa.select(signals.c.payload).where(
                signals.c.run_id == run_id, signals.c.name == name, signals.c.consumed_seq == seq
            )
        ).first()
        if mine is not None:
            return json.loads(mine[0]) if mine[0] is not None else None
        candidates = conn.execute(
            sa.select(signals.c.id, signals.c.payload)
            .where(
                signals.c.run_id == run_id,
                signals.c.name == name,
                signals.c.consumed_seq.is_(None),
            )
            .order_by(signals.c.id)
            .limit(5)
        ).all()
        for signal_id, payload in candidates:
            taken = conn.execute(
                signals.update()
                .where(signals.c.id == signal_id, signals.c.consumed_seq.is_(None))
                .values(consumed_seq=seq)
            ).rowcount
            if taken:
                return json.loads(payload) if payload is not None else None
    return MISSING


MISSING = _MISSING
