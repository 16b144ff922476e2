"""How the server serves the web UI (no browser: tests/test_ui.py drives Chromium).

The shell answers each page's address; static files are revalidated; an unknown
page address gets the shell with a 404 (the page says "not found"), while unknown
API addresses keep their JSON 404 and other methods keep their replies.
"""

from __future__ import annotations

import re

import pytest
from starlette.testclient import TestClient

from keel.server.app import create_app
from keel.server.ui import PAGES, STATIC


@pytest.fixture
def client() -> TestClient:
    # Called by the address a default server listens on (its Host check allows it).
    return TestClient(create_app(), base_url="http://127.0.0.1", raise_server_exceptions=False)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/runs/abc",
        "/runs/abc/steps/train-3",
        "/experiments",
        "/experiments/1",
        "/compare?runs=a,b",
        "/models",
        "/models/digits",
        "/launch?workflow=x",
    ],
)
def test_each_page_address_answers_the_shell(client: TestClient, path: str) -> None:
    reply = client.get(path)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/js/app.js">' in reply.text
    assert "default-src 'self'" in reply.headers["content-security-policy"]
    assert reply.headers["cache-control"] == "no-cache"
    assert "{{version}}" not in reply.text


def test_the_pages_are_not_in_the_api_document(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert not [p for p in paths if not p.startswith("/api/")]
    assert len(PAGES) == 9


def test_static_files_are_served_and_revalidated(client: TestClient) -> None:
    reply = client.get("/static/js/app.js")
    assert reply.status_code == 200
    assert "javascript" in reply.headers["content-type"]
    assert reply.headers["cache-control"] == "no-cache"
    again = client.get("/static/js/app.js", headers={"if-none-match": reply.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/static/vendor/uplot/uPlot.iife.min.js").status_code == 200


def test_every_module_the_pages_import_exists() -> None:
    """A static import of a missing file would break a page only in the browser."""
    js = STATIC / "js"
    for source in js.rglob("*.js"):
        for target in re.findall(r'from "(\.{1,2}/[^"]+)"', source.read_text()):
            assert (source.parent / target).resolve().is_file(), f"{source}: {target}"
    app = (js / "app.js").read_text()
    for page in re.findall(r'page: "([a-z]+)"', app):
        assert (js / "pages" / f"{page}.js").is_file(), page


def test_vendored_files_keep_their_licence() -> None:
    vendor = STATIC / "vendor"
    assert (vendor / "uplot" / "LICENSE").read_text().startswith("The MIT License")
    readme = (vendor / "README.md").read_text()
    assert "1.6.32" in readme
    assert "(v1.6.32)" in (vendor / "uplot" / "uPlot.iife.min.js").read_text()[:80]


def test_unknown_addresses(client: TestClient) -> None:
    page = client.get("/no/such/page")
    assert page.status_code == 404
    assert page.headers["content-type"].startswith("text/html")
    api = client.get("/api/v1/no-such-thing")
    assert api.status_code == 404
    assert api.json()["error"]["code"] == "not_found"
    assert client.get("/static/no-such-file.js").status_code == 404
    # Other methods are left alone: an unknown address is still a 404, a known API
    # address still refuses a method it does not take.
    assert client.post("/no/such/page").status_code == 404
    assert client.delete("/api/v1/runs").status_code == 405
