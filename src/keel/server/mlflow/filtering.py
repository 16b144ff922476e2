"""The small filters of MLflow's other searches (experiments, logged models, model
versions, registered models): `name LIKE 'x%' and tags.k = 'v'`, conditions joined
by AND, checked in Python against the few rows such searches look at.

Tokens come from keel's own filter tokenizer (tracking/filters.py); nothing is evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keel.errors import TrackingError
from keel.server.mlflow.common import invalid
from keel.tracking.filters import Token, tokenize

_KINDS = {
    "attribute": "attr",
    "attributes": "attr",
    "attr": "attr",
    "tag": "tags",
    "tags": "tags",
    "param": "params",
    "params": "params",
    "metric": "metrics",
    "metrics": "metrics",
}


@dataclass(frozen=True, slots=True)
class Cond:
    kind: str  # attr, tags, params, metrics
    key: str
    op: str  # =, !=, <, <=, >, >=, like, ilike, not like, not ilike, in, not in
    value: Any


def parse(text: Any) -> list[Cond]:
    if text in (None, ""):
        return []
    if not isinstance(text, str):
        raise invalid(f"filter must be a string, got {text!r}")
    try:
        tokens = tokenize(text)
    except TrackingError as exc:
        raise invalid(exc.message) from None
    conds: list[Cond] = []
    i = 0

    def fail(tok: Token, what: str) -> Exception:
        return invalid(f"invalid filter {text!r} at column {tok.pos + 1}: {what}")

    while True:
        tok = tokens[i]
        if tok.kind == "word":
            kind, key = "attr", tok.text
        elif tok.kind == "field":
            prefix, key = tok.value
            kind = _KINDS.get(str(prefix).lower(), "")
            if not kind:
                raise fail(tok, f"unknown kind of key {prefix!r}")
        else:
            raise fail(tok, "expected a key such as name or tags.<key>")
        i += 1
        tok = tokens[i]
        if tok.kind == "op" or (tok.kind == "keyword" and tok.value in ("like", "ilike", "in")):
            op = str(tok.value)
            i += 1
        elif tok.kind == "keyword" and tok.value == "not":
            nxt = tokens[i + 1]
            if not (nxt.kind == "keyword" and nxt.value in ("like", "ilike", "in")):
                raise fail(nxt, "expected LIKE, ILIKE or IN after NOT")
            op = f"not {nxt.value}"
            i += 2
        else:
            raise fail(tok, "expected an operator")
        value, i = _value(tokens, i, op.endswith("in"), fail)
        conds.append(Cond(kind, key, op, value))
        tok = tokens[i]
        if tok.kind == "end":
            return conds
        if not (tok.kind == "keyword" and tok.value == "and"):
            raise fail(tok, "expected AND or the end of the filter")
        i += 1


def _value(
    tokens: list[Token], i: int, many: bool, fail: Callable[[Token, str], Exception]
) -> tuple[Any, int]:
    def one(j: int) -> tuple[Any, int]:
        tok = tokens[j]
        if tok.kind in ("string", "number"):
            return tok.value, j + 1
        raise fail(tok, "expected a quoted value or a number")

    if not many:
        return one(i)
    if tokens[i].kind != "lparen":
        raise fail(tokens[i], "expected a list in parentheses after IN")
    values = []
    i += 1
    while True:
        value, i = one(i)
        values.append(value)
        if tokens[i].kind == "comma":
            i += 1
            continue
        if tokens[i].kind == "rparen":
            return tuple(values), i + 1
        raise fail(tokens[i], "expected ',' or ')'")


def _like(pattern: str, flags: int = 0) -> re.Pattern[str]:
    parts = []
    for ch in pattern:
        parts.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return re.compile("".join(parts), flags | re.DOTALL)


def matches(cond: Cond, actual: Any) -> bool:
    """Whether a row's value satisfies a condition (a missing value never does)."""
    if actual is None:
        return False
    op, want = cond.op, cond.value
    if op.endswith("like"):
        flags = re.IGNORECASE if "ilike" in op else 0
        found = _like(str(want), flags).fullmatch(str(actual)) is not None
        return found != op.startswith("not ")
    if op.endswith("in"):
        found = str(actual) in {str(v) for v in want}
        return found != op.startswith("not ")
    left: Any = actual
    right: Any = want
    if isinstance(want, float):
        try:
            left = float(actual)
        except (TypeError, ValueError):
            return False
    else:
        left, right = str(actual), str(want)
    return bool(
        {
            "=": left == right,
            "!=": left != right,
            "<": left < right,
            "<=": left <= right,
            ">": left > right,
            ">=": left >= right,
        }[op]
    )


def keep(conds: list[Cond], lookup: Callable[[Cond], Any]) -> bool:
    return all(matches(c, lookup(c)) for c in conds)
