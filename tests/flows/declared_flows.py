"""Schedules declared in code (loaded by path in one test only: once imported, its
declarations stay registered in the test process)."""

from __future__ import annotations

from datetime import datetime

import keel


@keel.workflow(
    name="declared_nightly", schedule="30 2 * * *", timezone="Europe/Paris", params={"n": 3}
)
def nightly(logical_date: datetime, n: int = 1) -> str:
    return f"{n}@{logical_date.isoformat()}"


@keel.workflow(
    name="declared_quarterly",
    schedule=keel.Schedule(every="15m", name="every-quarter", catchup="none", overlap="skip"),
)
def quarterly() -> int:
    return 1
