"""A batch as an ordered list of rows, for finding the rows the database refuses.

The recorder writes a batch in one transaction. When the database refuses a value
in it, the recorder splits the batch into its rows (`split`, in the order
`write_batch` writes them), writes them again in halves (`join`), and reports each
row refused on its own as a `Refusal` of the run it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from keel.errors import InvalidValueError
from keel.store import schema
from keel.store.limits import fit_row, shown, text_problem
from keel.store.metadata import Batch

# Batch fields in the order MetadataStore.write_batch writes them.
_ORDER = (
    "runs_new",
    "artifacts",
    "steps",
    "attempts",
    "logs",
    "cache",
    "metrics",
    "latest_metrics",
    "params",
    "tags",
    "logged_artifacts",
    "run_updates",
)
# Rows of keel's own records, whose text is made to fit rather than refused: a log
# line or an error message with a NUL in it must not cost the step its record.
_FREE_TEXT = {
    "runs_new": schema.runs,
    "steps": schema.steps,
    "attempts": schema.attempts,
    "logs": schema.logs,
    "run_updates": schema.runs,
}
_TRACKED = {"metrics": "metric", "latest_metrics": "metric", "params": "param", "tags": "tag"}

Part = tuple[str, Any]


def split(batch: Batch) -> list[Part]:
    parts: list[Part] = []
    for kind in _ORDER:
        if kind == "run_updates":
            parts.extend((kind, item) for item in batch.run_updates.items())
        else:
            parts.extend((kind, row) for row in getattr(batch, kind))
    return parts


def join(parts: list[Part]) -> Batch:
    batch = Batch()
    for kind, row in parts:
        if kind == "run_updates":
            run_id, values = row
            batch.run_updates.setdefault(run_id, {}).update(values)
        else:
            getattr(batch, kind).append(row)
    return batch


def fitted(part: Part) -> Part | None:
    """The part with its free text made to fit, or None if that changes nothing."""
    kind, row = part
    table = _FREE_TEXT.get(kind)
    if table is None:
        return None
    if kind == "run_updates":
        run_id, values = row
        fit: Any = (run_id, fit_row(table, values))
    else:
        fit = fit_row(table, row)
    return (kind, fit) if fit != row else None


def is_data_error(exc: BaseException, dialect: sa.Dialect) -> bool:
    """Whether the database (or its driver) refused a value, rather than failed."""
    if isinstance(exc, sa.exc.OperationalError):
        return False
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        exc = exc.orig
    if isinstance(exc, UnicodeError | OverflowError):
        return True
    # The raw DB-API error (PostgreSQL's COPY of metrics bypasses SQLAlchemy).
    dbapi = getattr(dialect, "loaded_dbapi", None)
    if dbapi is None:
        return False
    return isinstance(exc, dbapi.DataError | dbapi.IntegrityError)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A row the database refused: whose it was, what it held, and why."""

    run_id: str
    seq: int
    what: str
    reason: str

    @classmethod
    def of(cls, part: Part, db_message: str) -> Refusal:
        kind, row = part
        if kind == "run_updates":
            run_id, seq, texts = row[0], -1, list(row[1].values())
        elif isinstance(row, tuple):
            run_id, seq, texts = row[0], row[1], list(row)
        else:
            run_id = row.get("id") if kind == "runs_new" else row.get("run_id")
            seq, texts = row.get("seq", -1), list(row.values())
        what = _describe(kind, row)
        problems = [p for t in texts if isinstance(t, str) and (p := text_problem(t))]
        reason = f"it has {problems[0]}" if problems else db_message
        return cls(str(run_id), -1 if seq is None else int(seq), what, reason)

    def error(self) -> InvalidValueError:
        where = f"step {self.seq}" if self.seq >= 0 else "the run"
        return InvalidValueError(
            f"the metadata store refused {self.what} of {where}, so it is not recorded: "
            f"{self.reason}",
            field=self.what,
            run_id=self.run_id,
            hint="Change the value where the code logs it, then run it again "
            "(`keel retry` after the fix)",
        )


def _describe(kind: str, row: Any) -> str:
    if kind in _TRACKED:
        return f"{_TRACKED[kind]} {shown(row[2])}"
    if kind == "logged_artifacts":
        return f"logged artifact {shown(row[2])}"
    if kind == "steps":
        return f"the record of step {row.get('key')}"
    return {
        "runs_new": "the run's record",
        "run_updates": "an update of the run's record",
        "attempts": "the record of an attempt",
        "logs": "a log line",
        "artifacts": "a stored value's record",
        "cache": "a cache entry",
    }.get(kind, kind)
