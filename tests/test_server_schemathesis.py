"""Schemathesis against the OpenAPI document, in process (ASGI): for every operation,
generated requests never get a 500 and every reply matches the documented schema
(status code, content type, body). Bounded examples per operation keep it to a few
minutes; on SQLite and PostgreSQL (which refuses NUL characters: a 400, not a
500). The event streams (endless by design) are tested in test_server_live.py."""

from __future__ import annotations

from typing import Any

import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from keel.server import auth
from keel.store.metadata import open_store
from server_support import launch, wait_status

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 15  # per operation


def test_api_matches_its_schema(app: FastAPI) -> None:
    # Something to find: a finished run with steps, logs and outputs.
    api = TestClient(app)
    run = launch(api, "arith", params={"x": 2})
    wait_status(api, run["id"], "SUCCEEDED", "FAILED")
    headers = {"Authorization": "Bearer " + auth.create_token(open_store(), "fuzz", "admin")}
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app).exclude(
        path_regex=r"(/events|/logs/stream)$"
    )
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            # The checks are about the reply, not its speed: a generous read timeout
            # (schemathesis' default is 10 s), so a stall of a loaded machine is no error.
            case.call_and_validate(headers=headers, checks=CHECKS, timeout=120)

        try:
            check()
        except Exception as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc
