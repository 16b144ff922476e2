"""API tokens and roles.

Tokens are random strings shown once at creation and stored only as sha256 hashes.
Roles are ordered: viewer (read) < operator (trigger, cancel, resume, retry, signal)
< admin (tokens, registry changes).

Whether a request without a token is served (as the local admin) is decided by
`AuthMode`, not by whether a live token exists: only while no token has *ever* been
created in this store (revoked ones count; their rows are never deleted) and the
server listens on loopback (or was started with `--insecure-no-auth`). Revoking the
last token never opens the server again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa

from keel.errors import ConfigError, KeelError
from keel.server.errors import ApiError
from keel.store.metadata import MetadataStore
from keel.store.schema import tokens

ROLES = ("viewer", "operator", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    def allows(self, needed: str) -> bool:
        return _RANK[self.role] >= _RANK[needed]


# Who is calling when no tokens exist (a loopback-only server).
LOCAL = Principal("local", "admin")


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: MetadataStore, name: str, role: str) -> str:
    """Create a token; returns it (the only time it is visible)."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}", hint=f"Use one of: {', '.join(ROLES)}")
    if not name or len(name) > 200:
        raise ConfigError("a token needs a name of 1 to 200 characters")
    token = "keel_" + secrets.token_urlsafe(32)
    try:
        with store.engine.begin() as conn:
            conn.execute(
                tokens.insert().values(
                    name=name, role=role, token_hash=_hash(token), created_at=time.time()
                )
            )
    except sa.exc.IntegrityError:
        raise KeelError(
            f"a token named {name!r} exists already", hint="Pick another name or revoke it"
        ) from None
    global _created
    _created += 1  # after the commit: an open server in this process asks again at once
    return token


def revoke_token(store: MetadataStore, name: str) -> bool:
    with store.engine.begin() as conn:
        return bool(
            conn.execute(tokens.update().where(tokens.c.name == name).values(revoked=True)).rowcount
        )


def list_tokens(store: MetadataStore) -> list[dict[str, object]]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(tokens).order_by(tokens.c.id))
        return [
            {
                "name": r.name,
                "role": r.role,
                "created_at": r.created_at,
                "last_used_at": r.last_used_at,
                "revoked": r.revoked,
            }
            for r in rows
        ]


# `last_used_at` is a hint for people, not an audit record: written at most this often.
_LAST_USED_EVERY = 60.0


def token_ever_created(store: MetadataStore) -> bool:
    """Whether any token, live or revoked, exists in the store: a fact that, once
    true, stays true (token rows are revoked, never deleted)."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(tokens.c.id).limit(1)).first() is not None


class AuthMode:
    """Whether anonymous requests are served, decided once per server.

    `open_without_tokens` is fixed at start (loopback, or `--insecure-no-auth`); the
    store is then asked, at most every `_RECHECK_SECONDS` (at once after a token is
    created in this process), only until a token is seen, after which the answer is
    "no" for the life of the server, whatever is revoked later. While the store cannot
    be reached the last answer stands: no token can be created without it.
    """

    def __init__(self, store: MetadataStore, open_without_tokens: bool) -> None:
        self._store = store
        self._open = open_without_tokens
        self._checked_at = -_RECHECK_SECONDS
        self._checked_generation = -1

    def anonymous_allowed(self) -> bool:
        if not self._open:
            return False
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_SECONDS and self._checked_generation == _created:
            return True
        generation = _created
        try:
            if token_ever_created(self._store):
                self._open = False
        except sa.exc.OperationalError:
            return self._open  # unreachable: the request fails on its own if it needs the store
        self._checked_at, self._checked_generation = now, generation
        return self._open

    @property
    def tokens_required(self) -> bool:
        return not self.anonymous_allowed()


# How often an open server asks whether a token has appeared (another process may
# create one); tokens created in this process close it at once.
_RECHECK_SECONDS = 1.0
_created = 0  # tokens created by this process, a generation AuthMode compares
# Tokens checked against the store lately: while the store cannot be reached, a token
# seen valid within `_OUTAGE_GRACE` seconds is still honoured, so a loaded model keeps
# answering its callers through a database outage. Revocation is immediate otherwise.
_OUTAGE_GRACE = 300.0
_verified: dict[str, tuple[Principal, float]] = {}


def _unauthenticated(message: str) -> ApiError:
    return ApiError(
        401,
        "unauthenticated",
        message,
        {"hint": "Send `Authorization: Bearer <token>`; create one with `keel token create`"},
    )


def bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, if it is one."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if token and scheme.lower() == "bearer" else None


def authenticate(store: MetadataStore, mode: AuthMode, authorization: str) -> Principal:
    """The caller, from the value of the `Authorization` header ("" when absent)."""
    token = bearer(authorization)
    if token is None:
        if mode.anonymous_allowed():
            return LOCAL
        raise _unauthenticated("this server needs an API token")
    digest = _hash(token)
    try:
        with store.engine.connect() as conn:
            row = conn.execute(sa.select(tokens).where(tokens.c.token_hash == digest)).first()
    except sa.exc.OperationalError:
        known = _verified.get(digest)
        if known is not None and time.monotonic() - known[1] < _OUTAGE_GRACE:
            return known[0]
        raise
    if row is None or row.revoked:
        _verified.pop(digest, None)
        raise _unauthenticated("the API token is not valid or was revoked")
    principal = Principal(row.name, row.role)
    _verified[digest] = (principal, time.monotonic())
    now = time.time()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY:
        with store.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.id == row.id).values(last_used_at=now))
    return principal
