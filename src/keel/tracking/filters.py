"""The filter language of `keel.search_runs`: a tokenizer and a recursive-descent parser.

    metrics.accuracy > 0.9 and params.model = 'svc'
    (tags.team = 'vision' or tags.team IN ('nlp', 'audio')) and attributes.status != 'FAILED'
    metrics.`val loss` <= 0.2 and params."batch size" = 64

Grammar (keywords are case-insensitive):

    filter     := [or_expr] END
    or_expr    := and_expr ("or" and_expr)*
    and_expr   := primary ("and" primary)*
    primary    := "(" or_expr ")" | comparison
    comparison := field operator value
    field      := ENTITY "." (WORD | `quoted` | "quoted")
    operator   := = | != | < | <= | > | >= | [not] like | [not] ilike | [not] in
    value      := NUMBER | 'string' | "string" | "(" value ("," value)* ")"

The result is a small tree (`Comparison`, `BoolOp`) that search.py turns into SQL;
nothing here is ever evaluated as Python. Every error names the column and the
text of the token where parsing stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from keel.errors import TrackingError

Entity = Literal["metrics", "params", "tags", "attributes"]

ENTITIES: dict[str, Entity] = {
    "metrics": "metrics",
    "metric": "metrics",
    "params": "params",
    "param": "params",
    "parameters": "params",
    "tags": "tags",
    "tag": "tags",
    "attributes": "attributes",
    "attribute": "attributes",
    "attr": "attributes",
}

# Attribute name -> (canonical name, value type).
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "run_id": ("run_id", "text"),
    "id": ("run_id", "text"),
    "run_name": ("run_name", "text"),
    "status": ("status", "status"),
    "start_time": ("start_time", "time"),
    "end_time": ("end_time", "time"),
    "user": ("user", "text"),
    "user_id": ("user", "text"),
    "kind": ("kind", "text"),
    "step_key": ("step_key", "text"),
}
ATTRIBUTE_NAMES = ("run_id", "run_name", "status", "start_time", "end_time", "user", "kind")

# MLflow's status names, for users who bring their filters along.
STATUS_ALIASES = {"FINISHED": "SUCCEEDED", "KILLED": "CANCELLED", "SCHEDULED": "PENDING"}

COMPARISONS = ("=", "!=", "<", "<=", ">", ">=")
OPERATORS_TEXT = "=, !=, <, <=, >, >=, LIKE, ILIKE, IN"

_KEYWORDS = {"and", "or", "not", "like", "ilike", "in", "asc", "desc"}

FILTER_HINT = (
    "Write conditions like metrics.accuracy > 0.9 and params.model = 'svc' "
    "(see docs/tracking.md, 'Filters')"
)


# -- tokens -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # field, string, number, op, keyword, lparen, rparen, comma, word, end
    text: str  # as written in the filter
    pos: int  # 0-based offset in the filter
    value: Any = None


@dataclass(frozen=True, slots=True)
class Field:
    entity: Entity
    key: str


def _error(source: str, pos: int, text: str, what: str, hint: str = FILTER_HINT) -> TrackingError:
    near = f"near {text!r}" if text else "(at the end of the filter)"
    return TrackingError(f"{source} error at column {pos + 1} {near}: {what}", hint=hint)


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/:]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OPS = ("<=", ">=", "!=", "<>", "==", "=", "<", ">")
_QUOTES = {"'": "'", '"': '"', "`": "`"}


def _read_quoted(source: str, text: str, start: int) -> tuple[str, int]:
    """The text between the quote at `start` and its closing quote (doubled or
    backslash-escaped quotes inside), and the offset after the closing quote."""
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in (quote, "\\"):
            out.append(text[i + 1])
            i += 2
            continue
        if ch == quote:
            if i + 1 < len(text) and text[i + 1] == quote:
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise _error(
        source,
        start,
        text[start : start + 20],
        f"this quoted text has no closing {quote}",
        hint=f"Close it with {quote}; write a {quote} inside it twice",
    )


def tokenize(text: str, source: str = "filter") -> list[Token]:
    tokens: list[Token] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        start = i
        if ch == "(":
            tokens.append(Token("lparen", ch, start))
            i += 1
        elif ch == ")":
            tokens.append(Token("rparen", ch, start))
            i += 1
        elif ch == ",":
            tokens.append(Token("comma", ch, start))
            i += 1
        elif text.startswith(_OPS, i):
            op = next(o for o in _OPS if text.startswith(o, i))
            canonical = {"==": "=", "<>": "!="}.get(op, op)
            tokens.append(Token("op", op, start, canonical))
            i += len(op)
        elif ch in ("'", '"'):
            value, i = _read_quoted(source, text, i)
            tokens.append(Token("string", text[start:i], start, value))
        elif ch == "`":
            value, i = _read_quoted(source, text, i)
            tokens.append(Token("quoted_key", text[start:i], start, value))
        elif (m := _NUMBER.match(text, i)) is not None and (
            ch.isdigit() or ch == "." or (ch in "+-" and m.end() > i + 1)
        ):
            tokens.append(Token("number", m.group(), start, float(m.group())))
            i = m.end()
        elif (m := _WORD.match(text, i)) is not None:
            word = m.group()
            i = m.end()
            if word.lower() in _KEYWORDS:
                tokens.append(Token("keyword", word, start, word.lower()))
                continue
            entity, dot, key = word.partition(".")
            if not dot:
                tokens.append(Token("word", word, start))
                continue
            if not key and i < n and text[i] in ("`", '"'):
                key, i = _read_quoted(source, text, i)
            tokens.append(Token("field", text[start:i], start, (entity, key)))
        else:
            raise _error(source, start, ch, "unexpected character")
    tokens.append(Token("end", "", n))
    return tokens


# -- the tree ---------------------------------------------------------------------------


Value = str | float | tuple[str | float, ...]


@dataclass(frozen=True, slots=True)
class Comparison:
    """`field op value`. For params, tags and text attributes `value` is text; for
    metrics and times a number (epoch seconds for times); for IN a tuple."""

    field: Field
    op: str  # one of COMPARISONS, "like", "ilike", "not like", "not ilike", "in", "not in"
    value: Value
    pos: int


@dataclass(frozen=True, slots=True)
class BoolOp:
    op: Literal["and", "or"]
    items: tuple[Expr, ...]


Expr = Comparison | BoolOp


@dataclass(frozen=True, slots=True)
class OrderKey:
    field: Field
    descending: bool


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.tokens = tokenize(text, source)
        self.i = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def advance(self) -> Token:
        tok = self.tokens[self.i]
        if tok.kind != "end":
            self.i += 1
        return tok

    def fail(self, what: str, tok: Token | None = None, hint: str = FILTER_HINT) -> TrackingError:
        tok = tok or self.tok
        return _error(self.source, tok.pos, tok.text, what, hint)

    def is_keyword(self, *words: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.value in words

    # or_expr := and_expr ("or" and_expr)*
    def or_expr(self) -> Expr:
        items = [self.and_expr()]
        while self.is_keyword("or"):
            self.advance()
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else BoolOp("or", tuple(items))

    # and_expr := primary ("and" primary)*
    def and_expr(self) -> Expr:
        items = [self.primary()]
        while self.is_keyword("and"):
            self.advance()
            items.append(self.primary())
        return items[0] if len(items) == 1 else BoolOp("and", tuple(items))

    def primary(self) -> Expr:
        if self.tok.kind == "lparen":
            opening = self.advance()
            inner = self.or_expr()
            if self.tok.kind != "rparen":
                raise self.fail(
                    f"expected ')' to close the '(' at column {opening.pos + 1}, "
                    "or 'and' / 'or' to continue"
                )
            self.advance()
            return inner
        return self.comparison()

    def field(self) -> Field:
        tok = self.tok
        if tok.kind != "field":
            if tok.kind == "end":
                raise self.fail("expected a condition such as metrics.accuracy > 0.9")
            if tok.kind in ("word", "quoted_key", "string"):
                raise self.fail(
                    "expected metrics.<key>, params.<key>, tags.<key> or attributes.<name>"
                )
            raise self.fail("expected a condition such as metrics.accuracy > 0.9")
        self.advance()
        prefix, key = tok.value
        entity = ENTITIES.get(prefix.lower())
        if entity is None:
            raise self.fail(
                f"unknown kind of key {prefix!r}: use metrics., params., tags. or attributes.",
                tok,
            )
        if not key:
            raise self.fail(f"{prefix}. must be followed by a key", tok)
        if entity == "attributes":
            found = ATTRIBUTES.get(key.lower())
            if found is None:
                raise self.fail(
                    f"unknown attribute {key!r}: use one of {', '.join(ATTRIBUTE_NAMES)}", tok
                )
            key = found[0]
        return Field(entity, key)

    def operator(self, field: Field, field_tok: Token) -> tuple[str, Token]:
        tok = self.tok
        if tok.kind == "op":
            self.advance()
            return str(tok.value), tok
        if tok.kind == "keyword" and tok.value in ("like", "ilike", "in"):
            self.advance()
            return str(tok.value), tok
        if self.is_keyword("not"):
            self.advance()
            if self.is_keyword("like", "ilike", "in"):
                return f"not {self.advance().value}", tok
            raise self.fail("expected LIKE, ILIKE or IN after NOT")
        raise self.fail(
            f"expected an operator ({OPERATORS_TEXT}) after {field_tok.text}",
            hint=f"{FILTER_HINT}; quote keys with spaces: metrics.`val loss`",
        )

    def comparison(self) -> Comparison:
        field_tok = self.tok
        field = self.field()
        op, op_tok = self.operator(field, field_tok)
        kind = _value_kind(field)
        if kind == "number" and op not in COMPARISONS:
            raise self.fail(
                f"{field_tok.text} is a number: use one of {', '.join(COMPARISONS)}", op_tok
            )
        if kind == "time" and op not in COMPARISONS:
            raise self.fail(
                f"{field_tok.text} is a time: use one of {', '.join(COMPARISONS)}", op_tok
            )
        if op.endswith("in"):
            values = self.value_list(field, kind)
            return Comparison(field, op, values, field_tok.pos)
        value = self.value(field, kind, like=op.endswith("like"))
        return Comparison(field, op, value, field_tok.pos)

    def value_list(self, field: Field, kind: str) -> tuple[str | float, ...]:
        if self.tok.kind != "lparen":
            raise self.fail("expected a list in parentheses after IN, e.g. ('a', 'b')")
        self.advance()
        values = [self.value(field, kind)]
        while self.tok.kind == "comma":
            self.advance()
            values.append(self.value(field, kind))
        if self.tok.kind != "rparen":
            raise self.fail("expected ',' or ')' in the IN list")
        self.advance()
        return tuple(values)

    def value(self, field: Field, kind: str, like: bool = False) -> str | float:
        tok = self.tok
        if kind == "number":
            if tok.kind != "number":
                raise self.fail(f"expected a number to compare metrics.{field.key} with")
            self.advance()
            return float(tok.value)  # type: ignore[arg-type]
        if kind == "time":
            if tok.kind == "number":
                self.advance()
                return float(tok.value)  # type: ignore[arg-type]
            if tok.kind == "string":
                self.advance()
                return self.time_value(tok)
            raise self.fail(
                f"expected a time for attributes.{field.key}: epoch seconds or "
                "a quoted date such as '2026-11-30 14:00'"
            )
        if tok.kind == "string":
            self.advance()
            text = str(tok.value)
        elif tok.kind == "number" and not like:
            self.advance()
            text = tok.text  # params are text: 0.01 compares with '0.01' as written
        else:
            expected = "a quoted pattern such as 'svc%'" if like else "a quoted value such as 'svc'"
            raise self.fail(f"expected {expected}")
        if kind == "status" and not like:
            text = text.upper()
            text = STATUS_ALIASES.get(text, text)
        return text

    def time_value(self, tok: Token) -> float:
        try:
            moment = datetime.fromisoformat(str(tok.value).strip())
        except ValueError:
            raise self.fail(
                "expected a date and time such as '2026-11-30' or '2026-11-30 14:05:00'", tok
            ) from None
        # A date without a zone means local time, as `keel runs ls` shows times.
        return moment.timestamp()


def _value_kind(field: Field) -> str:
    if field.entity == "metrics":
        return "number"
    if field.entity == "attributes":
        return ATTRIBUTES[field.key][1]
    return "text"


def parse_filter(text: str) -> Expr | None:
    """The condition tree of a filter string; None for an empty filter."""
    if not isinstance(text, str):
        raise TrackingError(f"filter must be a string, got {type(text).__name__}", hint=FILTER_HINT)
    parser = _Parser(text, "filter")
    if parser.tok.kind == "end":
        return None
    expr = parser.or_expr()
    if parser.tok.kind != "end":
        if parser.tok.kind == "rparen":
            raise parser.fail("this ')' has no matching '('")
        raise parser.fail("expected 'and', 'or' or the end of the filter")
    return expr


ORDER_HINT = "Write order_by items like 'metrics.accuracy DESC' or 'attributes.start_time'"


def parse_order_by(item: str) -> OrderKey:
    """One `order_by` item: a field, then optionally ASC or DESC."""
    if not isinstance(item, str):
        raise TrackingError(f"order_by items must be strings, got {item!r}", hint=ORDER_HINT)
    parser = _Parser(item, "order_by")
    if parser.tok.kind == "end":
        raise parser.fail("expected a key such as metrics.accuracy", hint=ORDER_HINT)
    field = parser.field()
    descending = False
    if parser.is_keyword("asc", "desc"):
        descending = parser.advance().value == "desc"
    if parser.tok.kind != "end":
        raise parser.fail("expected ASC, DESC or the end of the item", hint=ORDER_HINT)
    return OrderKey(field, descending)
