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
    store is then asked only until a token is seen, after which the answer is "no"
    for the life of the server, whatever is revoked later.
    """

    def __init__(self, store: MetadataStore, open_without_tokens: bool) -> None:
        self._store = store
        self._open = open_without_tokens

    def anonymous_allowed(self) -> bool:
        if self._open and token_ever_created(self._store):
            self._open = False
        return self._open

    @property
    def tokens_required(self) -> bool:
        return not self.anonymous_allowed()


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
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(tokens).where(tokens.c.token_hash == _hash(token))).first()
    if row is None or row.revoked:
        raise _unauthenticated("the API token is not valid or was revoked")
    now = time.time()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY:
        with store.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.id == row.id).values(last_used_at=now))
    return Principal(row.name, row.role)
