"""What the metadata store can hold, and checks that say exactly what does not fit.

Both databases must accept the same values, so the rules are the stricter of the two:
PostgreSQL refuses NUL characters in text, neither driver can encode a lone surrogate
(text that is not valid Unicode), integers are 64-bit, and PostgreSQL enforces the
sizes of `String(n)` columns that SQLite ignores. Values a user names (keys, params,
tags, names) are checked where they are given and refused with an `InvalidValueError`;
free text keel records on its own (captured logs, error messages) is made to fit.
"""

from __future__ import annotations

import math
from typing import Any

import sqlalchemy as sa

from keel.errors import InvalidValueError

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_HINT = "Remove the character from the value (keel stores text as UTF-8, without NUL)"


def shown(text: str, width: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    return repr(text[:width]) + ("..." if len(text) > width else "")


def text_problem(text: str) -> str | None:
    """What makes `text` unfit for a text column (naming the character and its
    position), or None. Costs one scan for ASCII text."""
    if "\x00" in text:
        return f"a NUL character ('\\x00') at position {text.index(chr(0))}"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (
                f"a lone surrogate ({text[exc.start]!r}) at position {exc.start}, "
                "which is not valid Unicode"
            )
    return None


def check_text(what: str, text: str, *, limit: int | None = None, field: str | None = None) -> str:
    """`text` if it fits; else an `InvalidValueError` naming `what` and the problem."""
    problem = text_problem(text)
    if problem is not None:
        raise InvalidValueError(f"{what} {shown(text)} has {problem}", field=field, hint=_HINT)
    if limit is not None and len(text) > limit:
        raise InvalidValueError(
            f"{what} {shown(text)} has {len(text)} characters; at most {limit} fit",
            field=field,
        )
    return text


def check_int64(what: str, value: int, *, field: str | None = None) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidValueError(
            f"{what} {value} is out of range: it must fit in 64 bits ({INT64_MIN} to {INT64_MAX})",
            field=field,
        )
    return value


def check_finite(what: str, value: float, *, field: str | None = None) -> float:
    if not math.isfinite(value):
        raise InvalidValueError(f"{what} must be a finite number, got {value!r}", field=field)
    return value


def clean_text(text: str) -> str:
    """Free text made storable: NUL and lone surrogates become backslash escapes."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def fit_row(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    """A row of `table` whose text fits: cleaned, and cut to its `String(n)` columns."""
    out = dict(row)
    for name, value in row.items():
        if not isinstance(value, str):
            continue
        fitted = clean_text(value)
        column = table.columns.get(name)
        length = getattr(column.type, "length", None) if column is not None else None
        if length is not None and len(fitted) > length:
            fitted = fitted[: length - 3] + "..."
        out[name] = fitted
    return out
