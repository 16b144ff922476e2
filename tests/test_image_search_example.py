"""examples/image_search.py end to end, on SQLite and PostgreSQL: build and register
the index with a durable run, then serve the search pipeline on a real uvicorn
(ephemeral and recorded) and search with digits images."""

from __future__ import annotations

from pathlib import Path

import httpx
from sklearn.datasets import load_digits

import keel
from keel.sdk.loader import load_workflow
from keel.serving.workflow_app import create_workflow_app
from keel.store.metadata import open_store
from keel.tracking import models
from server_support import live_server

EXAMPLE = Path(__file__).parent.parent / "examples" / "image_search.py"


def test_image_search_builds_registers_and_serves(backend: str) -> None:
    handle = keel.run(load_workflow(f"{EXAMPLE}:build_index"), n_components=12)
    assert handle.result() == {"version": 1, "images": 1797}
    version = keel.models.get_version("digits-search", "champion")
    assert (version.version, version.flavor) == (1, "pyfunc")

    digits = load_digits()
    store = open_store()
    for ephemeral in (True, False):
        app = create_workflow_app(f"{EXAMPLE}:search", ephemeral=ephemeral, store=store)
        with live_server(app) as url, httpx.Client(base_url=url, timeout=60) as client:
            for i in (0, 42, 1000):
                image = digits.data[i].tolist()
                reply = client.post("/run", json={"image": image, "k": 3})
                assert reply.status_code == 200, reply.text
                found = reply.json()["result"]
                # The image itself is in the index: its own nearest neighbour.
                assert found["ids"][0] == i and found["distances"][0] == 0.0
                assert found["labels"][0] == digits.target[i]
                assert len(found["ids"]) == len(found["labels"]) == 3
                assert found["model"] == "models:/digits-search/1"
            short = client.post("/run", json={"image": [1.0] * 63})
            assert short.status_code == 422 and "'image'" in short.json()["error"]["message"]
            dark = client.post("/run", json={"image": [-1.0] * 64})
            assert dark.status_code == 422, dark.text
    # A stopped app leaves keel.load_model as it found it (no cache in other code).
    assert models._load_hook is None
    recorded = keel.Client().runs(workflow="search")
    assert len(recorded) == 3 and all(r.status == "SUCCEEDED" for r in recorded)
