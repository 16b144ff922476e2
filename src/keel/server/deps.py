"""Dependencies shared by the routes: the store, and the caller with a role check."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request

from keel.server import audit
from keel.server.auth import AuthMode, Principal, authenticate
from keel.server.errors import ApiError
from keel.store.metadata import MetadataStore


def get_store(request: Request) -> MetadataStore:
    store: MetadataStore = request.app.state.store
    return store


def require(role: str) -> Callable[[Request], Coroutine[Any, Any, Principal]]:
    """A dependency: the caller, who must have at least `role` (viewer/operator/admin)."""

    async def dependency(request: Request) -> Principal:
        # The guard (guard.py) authenticated the caller before the body was read.
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            mode: AuthMode = request.app.state.auth_mode
            principal = authenticate(
                get_store(request), mode, request.headers.get("authorization", "")
            )
            request.state.principal = principal
        if not principal.allows(role):
            raise ApiError(
                403,
                "forbidden",
                f"this needs the {role} role; token {principal.name!r} has {principal.role}",
            )
        route = request.scope.get("route")
        audit.arm(principal.name, principal.role, getattr(route, "status_code", None))
        return principal

    return dependency
