"""API tokens (admins): create (the token is shown once), list, revoke; and `me`,
who the caller is."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from keel.server import auth
from keel.server.errors import ApiError
from keel.server.routes.common import AUTH, ERRORS, Admin, Store, Viewer

router = APIRouter(tags=["tokens"], dependencies=AUTH, responses=ERRORS)

Role = Literal["viewer", "operator", "admin"]


class TokenIn(BaseModel):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[\w.@:-]+$")
    role: Role


class TokenOut(BaseModel):
    name: str
    role: str
    created_at: float
    last_used_at: float | None
    revoked: bool


class NewToken(BaseModel):
    name: str
    role: str
    token: str = Field(description="Shown only now: the server keeps only its hash")


class Me(BaseModel):
    name: str
    role: str
    tokens_required: bool


@router.get("/me", response_model=Me)
def me(principal: Viewer, request: Request) -> Me:
    """Who the caller is, and whether this server asks for tokens."""
    mode: auth.AuthMode = request.app.state.auth_mode
    return Me(name=principal.name, role=principal.role, tokens_required=mode.tokens_required)


@router.get("/tokens", response_model=list[TokenOut])
def list_tokens(_: Admin, store: Store) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in auth.list_tokens(store)]


@router.post("/tokens", response_model=NewToken, status_code=201)
def create_token(body: TokenIn, _: Admin, store: Store) -> NewToken:
    """Create a token; the reply holds it, for the only time."""
    if any(t["name"] == body.name for t in auth.list_tokens(store)):
        raise ApiError(409, "conflict", f"a token named {body.name!r} exists already")
    token = auth.create_token(store, body.name, body.role)
    return NewToken(name=body.name, role=body.role, token=token)


@router.delete("/tokens/{name}", response_model=TokenOut)
def revoke_token(name: Annotated[str, Path(max_length=200)], _: Admin, store: Store) -> TokenOut:
    """Revoke a token: it stops working at once (its record stays, marked revoked)."""
    if not auth.revoke_token(store, name):
        raise ApiError(404, "not_found", f"no token named {name!r}")
    found = next(t for t in auth.list_tokens(store) if t["name"] == name)
    return TokenOut.model_validate(found)
