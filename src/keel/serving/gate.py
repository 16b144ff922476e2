"""The front door of `keel serve`: the guard of `keel server` (server/guard.py) with
the serving endpoints' policy, and the check that refuses to listen beyond loopback
while anyone could call.

Who may call (docs/serving.md, "Who can call it"): `/ping`, `/health` and `/version`
are open (load balancers, probes); everything else needs a caller: the local admin
while the server is on loopback and no API token was ever created, else
`Authorization: Bearer <token>`: viewer for `/invocations`, `/metrics`, an ephemeral
`POST /run` and `GET /runs/{id}`; operator for a recorded `POST /run` and `POST /runs`
(they write runs). The token and role are checked, and the body capped at
`--max-body-bytes`, before any of the body is read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette

from keel.errors import ServingError
from keel.server import auth
from keel.server.guard import JSON_TYPE, Door, GateConfig, Guard, Refused, is_loopback
from keel.serving.options import ServeOptions
from keel.store.metadata import MetadataStore

OPEN_PATHS = frozenset({"/ping", "/health", "/version"})
CSV_TYPE = "text/csv"  # the other body MLflow's scoring protocol takes (protocol.py)


@dataclass(frozen=True)
class ServingPolicy:
    """`role_of(method, path)`: the least role of a path that is not open.
    `upper_codes`: error codes as the model endpoint writes them (PAYLOAD_TOO_LARGE)."""

    role_of: Callable[[str, str], str]
    body_types: frozenset[str] = frozenset({JSON_TYPE})
    upper_codes: bool = False
    webhooks: bool = field(default=False, init=False)

    def door(self, method: str, path: str, config: GateConfig) -> Door:
        role = None if path in OPEN_PATHS else self.role_of(method, path)
        return Door(role, self.body_types, config.max_body)

    def render(self, path: str, refused: Refused) -> dict[str, Any]:
        if not self.upper_codes:
            return refused.body()
        code = "PAYLOAD_TOO_LARGE" if refused.code == "too_large" else refused.code.upper()
        return refused.body(code)


def model_policy() -> ServingPolicy:
    return ServingPolicy(lambda method, path: "viewer", frozenset({JSON_TYPE, CSV_TYPE}), True)


def workflow_policy(ephemeral: bool) -> ServingPolicy:
    def role_of(method: str, path: str) -> str:
        # A recorded call writes a durable run; reading one, or an in-memory call, does not.
        writes = method == "POST" and (path == "/runs" or (path == "/run" and not ephemeral))
        return "operator" if writes else "viewer"

    return ServingPolicy(role_of)


def gate_config(options: ServeOptions) -> GateConfig:
    """The guard's limits for `options`: the bound host, the allowed host names (also
    KEEL_SERVER_ALLOWED_HOSTS), one body cap (`max_body_bytes`)."""
    env = GateConfig.from_env(options.host, options.allowed_hosts, options.insecure_no_auth)
    return GateConfig(
        bind_host=options.host,
        allowed_hosts=env.allowed_hosts,
        insecure_no_auth=options.insecure_no_auth,
        max_body=options.max_body_bytes,
        max_upload=options.max_body_bytes,
        max_json_depth=env.max_json_depth,
    )


def guard(
    app: Starlette, store: MetadataStore, options: ServeOptions, policy: ServingPolicy
) -> None:
    """Put the guard in front of `app`'s routes."""
    config = gate_config(options)
    mode = auth.AuthMode(store, config.loopback or config.insecure_no_auth)
    app.add_middleware(Guard, store=store, config=config, mode=mode, policy=policy)


def check_exposure(store: MetadataStore, options: ServeOptions) -> None:
    """Refuse to listen beyond loopback while no API token exists (anyone who reaches
    the address could call, and start runs), unless `insecure_no_auth` says the
    network is the caller's alone; then warn on stderr."""
    if is_loopback(options.host) or auth.token_ever_created(store):
        return
    if not options.insecure_no_auth:
        raise ServingError(
            f"refusing to listen on {options.host}: no API token exists, so anyone who can "
            "reach this address could call the endpoint and start runs",
            hint="Create one first (keel token create NAME --role operator), listen on "
            "127.0.0.1, or pass --insecure-no-auth if the network is yours alone",
        )
    print(
        f"WARNING: --insecure-no-auth: anyone who can reach {options.host}:{options.port} may "
        "call this endpoint (and start runs) until an API token is created",
        file=sys.stderr,
    )
