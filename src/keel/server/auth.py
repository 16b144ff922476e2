"""API tokens and roles.

Tokens are random strings shown once at creation and stored only as sha256 hashes.
Roles are ordered: viewer (read) < operator (trigger, cancel, resume, retry, signal)
< admin (tokens, registry changes). With no token in the store the server accepts
every request, and `keel server` then refuses to listen beyond loopback.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from fastapi import Request

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
    _configured.pop(id(store), None)
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
    _configured.pop(id(store), None)
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


# Whether any token exists is asked on every request without one; it changes only
# when tokens are created or revoked, so the answer is kept for a moment.
_CONFIGURED_TTL = 2.0
_configured: dict[int, tuple[float, bool]] = {}
# `last_used_at` is a hint for people, not an audit record: written at most this often.
_LAST_USED_EVERY = 60.0


def tokens_configured(store: MetadataStore) -> bool:
    cached = _configured.get(id(store))
    now = time.monotonic()
    if cached is not None and now - cached[0] < _CONFIGURED_TTL:
        return cached[1]
    with store.engine.connect() as conn:
        answer = (
            conn.execute(
                sa.select(sa.func.count()).select_from(tokens).where(tokens.c.revoked.is_(False))
            ).scalar()
            or 0
        ) > 0
    _configured[id(store)] = (now, answer)
    return answer


def authenticate(store: MetadataStore, request: Request) -> Principal:
    """The caller of a request, from its `Authorization: Bearer <token>` header."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not token or scheme.lower() != "bearer":
        if not tokens_configured(store):
            return LOCAL
        raise ApiError(
            401,
            "unauthenticated",
            "this server needs an API token",
            {"hint": "Send `Authorization: Bearer <token>`; create one with `keel token create`"},
        )
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(tokens).where(tokens.c.token_hash == _hash(token.strip()))
        ).first()
    if row is None or row.revoked:
        raise ApiError(401, "unauthenticated", "the API token is not valid or was revoked")
    now = time.time()
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY:
        with store.engine.begin() as conn:
            conn.execute(tokens.update().where(tokens.c.id == row.id).values(last_used_at=now))
    return Principal(row.name, row.role)
