"""Run and step statuses, as stored."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StepStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CACHED = "CACHED"
    SKIPPED = "SKIPPED"
    CANCELLED = "CANCELLED"  # stopped by a cancellation of its run; a resume runs it again


FINISHED_RUN = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
REUSABLE_STEP = frozenset({StepStatus.SUCCEEDED, StepStatus.CACHED})
