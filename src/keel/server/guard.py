"""The front door: pure ASGI middleware in front of every route of `keel server`, and
(with a `serving.gate` policy) of the endpoints of `keel serve`.

In this order, each from the request's headers before any of its body is read:
1. `Host` must name this server (its bound address, loopback names, `--allowed-host`
   ones): a DNS-rebinding page gets 400.
2. A state-changing request (POST/PUT/PATCH/DELETE) with an `Origin` that is not the
   server's own, or `Sec-Fetch-Site: cross-site`, gets 403; its body must be JSON
   (415 otherwise), except artifact files (PUT and DELETE of mlflow-artifacts, which
   no HTML form can send and a browser sends cross-site only after a CORS preflight
   this server never grants).
3. API routes authenticate the caller (401 before the body is read); the role check
   stays with each route (`deps.require`). A policy may name a route's least role,
   which is then checked here too (403 before the body).
4. Bodies are capped: `Content-Length` over the cap, or more bytes streamed than it
   (chunked bodies too), get 413. JSON bodies (capped at `max_body`) are read here,
   and nested deeper than `max_json_depth` get 400; uploads stream through with
   their own cap (`max_upload`).

What differs per app (which paths are open, which role a path needs, which content
types a change may have, how a refusal is written) is its `Policy`; `ServerPolicy`
is `keel server`'s.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keel import errors as keel_errors
from keel.server import auth
from keel.server.errors import RETRY_AFTER, ApiError, store_unreachable
from keel.store.metadata import MetadataStore

log = logging.getLogger("keel.server.guard")

MIB = 1024 * 1024
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})
_MLFLOW_PREFIXES = ("/api/2.0/", "/ajax-api/2.0/", "/api/3.0/")
# API paths anyone may call: liveness, the API's own description.
_PUBLIC = frozenset({"/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs"})
_WEBHOOK = re.compile(r"^/api/v1/triggers/[^/]+$")
_FILES = re.compile(r"^/(api|ajax-api)/2\.0/mlflow-artifacts/artifacts/")
JSON_TYPE = "application/json"
JSON_ONLY = frozenset({JSON_TYPE})


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise keel_errors.ConfigError(
            f"{name} must be a whole number, got {raw!r}", hint=f"Unset {name} or fix it"
        ) from None
    if value < 1:
        raise keel_errors.ConfigError(f"{name} must be at least 1, got {value}")
    return value


def _env_hosts() -> tuple[str, ...]:
    raw = os.environ.get("KEEL_SERVER_ALLOWED_HOSTS", "")
    return tuple(h.strip() for h in raw.split(",") if h.strip())


@dataclass(frozen=True, slots=True)
class GateConfig:
    """What the front door lets in. `from_env` reads the KEEL_SERVER_* variables
    (docs/deployment.md)."""

    bind_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    insecure_no_auth: bool = False
    max_body: int = 8 * MIB  # JSON bodies: read whole, before the route
    max_upload: int = 2048 * MIB  # artifact uploads: streamed to the store
    max_json_depth: int = 64

    @classmethod
    def from_env(
        cls,
        bind_host: str = "127.0.0.1",
        allowed_hosts: tuple[str, ...] = (),
        insecure_no_auth: bool = False,
    ) -> GateConfig:
        return cls(
            bind_host=bind_host,
            allowed_hosts=(*_env_hosts(), *allowed_hosts),
            insecure_no_auth=insecure_no_auth,
            max_body=_env_int("KEEL_SERVER_MAX_BODY", 8 * MIB),
            max_upload=_env_int("KEEL_SERVER_MAX_UPLOAD", 2048 * MIB),
            max_json_depth=_env_int("KEEL_SERVER_MAX_JSON_DEPTH", 64),
        )

    @property
    def loopback(self) -> bool:
        return is_loopback(self.bind_host)

    def host_allowed(self, hostname: str) -> bool:
        """Whether a `Host` header's name (without port) names this server."""
        name = hostname.lower().strip("[]")
        if name in LOOPBACK_NAMES or name in (h.lower().strip("[]") for h in self.allowed_hosts):
            return True
        bound = self.bind_host.lower().strip("[]")
        if bound in _WILDCARDS:
            # Listening on every address: which names reach it is not known here, so
            # any is accepted unless --allowed-host lists them.
            return not self.allowed_hosts
        return name == bound


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Refused(ApiError):
    """A request the front door (or an upload's capped stream) turns away."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        hint: str | None = None,
        **facts: Any,
    ) -> None:
        details = {**({"hint": hint} if hint else {}), **facts}
        super().__init__(status, code, message, details or None)
        self.hint = hint
        self.facts = facts

    def body(self, code: str | None = None) -> dict[str, Any]:
        """The REST API's error shape (`code` replaces the guard's own)."""
        details = {**({"hint": self.hint} if self.hint else {}), **self.facts} or None
        return {"error": {"code": code or self.code, "message": self.message, "details": details}}


_MLFLOW_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    413: "BAD_REQUEST",
    415: "BAD_REQUEST",
    503: "TEMPORARILY_UNAVAILABLE",
}


@dataclass(frozen=True, slots=True)
class Door:
    """What one request must bring. `role`: the least role, checked before the body
    (None: open to anyone). `body_types`: the media types a change may carry (None:
    raw bytes, streamed to the route). `cap`: the most body bytes."""

    role: str | None
    body_types: frozenset[str] | None
    cap: int


class Policy(Protocol):
    """What the guard asks of the app it stands in front of."""

    @property
    def webhooks(self) -> bool:
        """Whether `POST /api/v1/triggers/NAME` carries its own webhook token."""
        ...

    def door(self, method: str, path: str, config: GateConfig) -> Door: ...

    def render(self, path: str, refused: Refused) -> dict[str, Any]: ...


class ServerPolicy:
    """`keel server`: its API paths need a caller (roles checked by each route), the
    web UI and liveness are open, artifact files stream, MLflow paths answer in
    MLflow's error shape."""

    webhooks = True

    def door(self, method: str, path: str, config: GateConfig) -> Door:
        # Artifact files (PUT to upload, DELETE): bytes, not JSON arguments.
        if method in ("PUT", "DELETE") and _FILES.match(path):
            cap = config.max_upload if method == "PUT" else config.max_body
            return Door("viewer" if _needs_auth(path) else None, None, cap)
        return Door("viewer" if _needs_auth(path) else None, JSON_ONLY, config.max_body)

    def render(self, path: str, refused: Refused) -> dict[str, Any]:
        if path.startswith(_MLFLOW_PREFIXES):
            text = refused.message + (f" ({refused.hint})" if refused.hint else "")
            return {"error_code": _MLFLOW_CODES[refused.status], "message": text}
        return refused.body()


SERVER = ServerPolicy()


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def nests_deeper(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in a JSON text nest deeper than `limit` (brackets in
    strings do not count; invalid JSON is left to the parser). The scans are C loops;
    only the brackets left after them are walked here."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for byte in _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKET):
        depth += 1 if byte in (0x5B, 0x7B) else -1  # [ { open, ] } close
        if depth > limit:
            return True
    return False


class Guard:
    """Pure ASGI middleware: the checks of the module docstring, then the app."""

    def __init__(
        self,
        app: ASGIApp,
        store: MetadataStore,
        config: GateConfig,
        mode: auth.AuthMode,
        policy: Policy = SERVER,
    ) -> None:
        self.app = app
        self.store = store
        self.config = config
        self.mode = mode
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = _headers(scope)
        try:
            self._check_host(headers)
            method = scope["method"]
            door = self.policy.door(method, path, self.config)
            kind = _media_type(headers)
            if method in MUTATING:
                self._check_origin(headers)
                self._check_content_type(headers, kind, door.body_types)
            await self._authenticate(scope, path, headers, door.role)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > door.cap:
                raise _too_large(door.cap)
            if method in MUTATING and door.body_types is not None:
                body = await _read_body(receive, door.cap)
                if kind in ("", JSON_TYPE):
                    await self._check_json(body)
                receive = _replay(body, receive)
            else:
                receive = _capped(receive, door.cap)
        except Refused as refused:
            await self._refuse(scope, send, refused)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, and a 413 if an upload's stream passes its cap while it reads."""
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Refused as refused:
            if started:
                raise
            await self._refuse(scope, send, refused)

    def _check_host(self, headers: dict[str, str]) -> None:
        host = headers.get("host", "")
        if host.startswith("["):  # [v6]:port
            name = host[1:].partition("]")[0]
        else:
            name = host.rpartition(":")[0] if ":" in host else host
        if not host or not self.config.host_allowed(name):
            raise Refused(
                400,
                "bad_host",
                f"this server does not answer to the host name {host!r}",
                "Call it by the address it listens on, or start it with --allowed-host NAME "
                "(or KEEL_SERVER_ALLOWED_HOSTS)",
            )

    def _check_origin(self, headers: dict[str, str]) -> None:
        origin = headers.get("origin")
        cross = headers.get("sec-fetch-site") == "cross-site"
        if origin is not None:
            own = headers.get("host", "").lower()
            _, _, netloc = origin.lower().partition("://")
            cross = cross or netloc.rstrip("/") != own
        if cross:
            raise Refused(
                403,
                "cross_origin",
                f"a state-changing request from another site (Origin {origin!r}) is refused",
                "Call the API from the server's own pages or from a program (no Origin header)",
            )

    def _check_content_type(
        self, headers: dict[str, str], kind: str, accepted: frozenset[str] | None
    ) -> None:
        if accepted is None:
            return
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if kind in accepted or (not kind and not has_body):
            return
        if accepted == JSON_ONLY:
            message = f"this request needs a JSON body (application/json), not {kind or 'none'}"
            hint = "Send the arguments as a JSON object with Content-Type: application/json"
        else:
            named = " or ".join(sorted(accepted))
            message = f"this request's body must be {named}, not {kind or 'none'}"
            hint = f"Send Content-Type: {named}"
        raise Refused(415, "unsupported_media_type", message, hint)

    async def _check_json(self, body: bytes) -> None:
        limit = self.config.max_json_depth
        # A big body is scanned in a worker thread, not on the event loop.
        deep = (
            await run_in_threadpool(nests_deeper, body, limit)
            if len(body) > 64 * 1024
            else nests_deeper(body, limit)
        )
        if deep:
            raise Refused(
                400,
                "json_too_deep",
                f"the JSON body nests deeper than {limit} levels",
                "Flatten the request body (KEEL_SERVER_MAX_JSON_DEPTH sets the limit)",
            )

    async def _authenticate(
        self, scope: Scope, path: str, headers: dict[str, str], role: str | None
    ) -> None:
        if self.policy.webhooks and scope["method"] == "POST" and _WEBHOOK.match(path):
            # The webhook's own token is compared in the route; without one at all,
            # the request ends here, before its body is read.
            query = scope.get("query_string", b"").decode("latin-1")
            if not headers.get("x-keel-trigger-token") and not _has_param(query, "token"):
                name = path.rsplit("/", 1)[1]
                raise Refused(
                    401,
                    "unauthenticated",
                    f"firing trigger {name!r} needs its webhook token",
                    "Send it as the X-Keel-Trigger-Token header",
                )
            return
        if role is None:
            return
        try:
            principal = await run_in_threadpool(
                auth.authenticate, self.store, self.mode, headers.get("authorization", "")
            )
        except ApiError as exc:
            raise Refused(exc.status, exc.code, exc.message, _hint(exc.details)) from None
        except Exception as exc:
            if store_unreachable(exc):
                raise Refused(
                    503, "store_unavailable", "the metadata store cannot be reached; try again"
                ) from None
            raise
        if not principal.allows(role):
            raise Refused(
                403,
                "forbidden",
                f"this needs the {role} role; token {principal.name!r} has {principal.role}",
                f"Call it with a token of the {role} role (keel token create NAME --role {role})",
            )
        scope.setdefault("state", {})["principal"] = principal

    async def _refuse(self, scope: Scope, send: Send, refused: Refused) -> None:
        await _refuse(send, refused, self.policy.render(scope["path"], refused))


def _needs_auth(path: str) -> bool:
    if path.startswith(_MLFLOW_PREFIXES):
        return True
    return (
        path.startswith("/api/v1/") and path not in _PUBLIC and not path.startswith("/api/v1/docs")
    )


def _has_param(query: str, name: str) -> bool:
    return any(k == name and v for k, v in parse_qsl(query, keep_blank_values=True))


def _hint(details: Any) -> str | None:
    return details.get("hint") if isinstance(details, dict) else None


def _too_large(cap: int) -> Refused:
    return Refused(
        413,
        "too_large",
        f"the request body is larger than this server accepts ({cap} bytes)",
        "KEEL_SERVER_MAX_BODY (JSON) and KEEL_SERVER_MAX_UPLOAD (artifact uploads) set the "
        "caps of keel server, --max-body-bytes the one of keel serve",
        limit=cap,
    )


def _media_type(headers: dict[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


async def _read_body(receive: Receive, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _too_large(cap)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body read already, then whatever comes next (a
    disconnect, which event streams wait for)."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _capped(receive: Receive, cap: int) -> Receive:
    """A receive that counts the streamed bytes and stops the request past `cap`."""
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > cap:
                raise _too_large(cap)
        return message

    return counted


async def _refuse(send: Send, refused: Refused, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
    ]
    if refused.status == 503:
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    if refused.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
