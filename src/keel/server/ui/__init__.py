"""The web UI: one HTML shell for every page, and the static files it loads.

The pages are plain ES modules under `static/js` that call the REST API in the
browser; nothing is built. The shell is answered for each client-side route so
that a page can be reloaded or linked to; everything else comes from /static.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from keel import __version__

STATIC = Path(__file__).parent / "static"

# The client-side routes (static/js/app.js knows the same list).
PAGES = (
    "/",
    "/runs/{run_id}",
    "/runs/{run_id}/steps/{step_key}",
    "/experiments",
    "/experiments/{experiment_id}",
    "/compare",
    "/models",
    "/models/{name}",
    "/launch",
)

# The shell names no page data; a strict policy keeps injected markup inert.
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class _StaticFiles(StaticFiles):
    """Static files that the browser revalidates (by ETag) before reusing."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ())]
                headers.append((b"cache-control", b"no-cache"))
                headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


# Paths that are never pages: their unknown URLs keep their own JSON 404 replies.
_NOT_PAGES = ("/api/", "/ajax-api/", "/static/", "/mlflow-artifacts/")


class _PageFallback(Route):
    """Any other GET of a path that no route answers: the shell with status 404, so a
    mistyped address shows a readable "not found" page. It matches nothing else (no
    other method, no API path), so it changes no reply of the APIs."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope.get("method") not in ("GET", "HEAD")
            or path.startswith(_NOT_PAGES)
            or path in ("/api", "/ajax-api", "/static")
        ):
            return Match.NONE, {}
        return super().matches(scope)


def shell() -> str:
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return html.replace("{{version}}", __version__)


def mount(app: FastAPI) -> None:
    """Serve the UI from `app`: the shell at each page's path, the files under /static."""
    page = shell()

    headers = {
        "cache-control": "no-cache",
        "content-security-policy": _CSP,
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
    }

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=headers)

    async def not_found(_: Request) -> HTMLResponse:
        return HTMLResponse(page, status_code=404, headers=headers)

    for path in PAGES:
        app.add_api_route(path, index, methods=["GET"], include_in_schema=False)
    app.mount("/static", _StaticFiles(directory=STATIC), name="static")
    app.router.routes.append(_PageFallback("/{path:path}", not_found, methods=["GET"]))
