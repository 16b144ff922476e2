"""The in-memory runtime of ephemeral workflow calls (keel/serving/ephemeral.py):
the SDK's calls behave as in a recorded run, and nothing touches a store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import keel
from keel.errors import DefinitionError
from keel.serving.ephemeral import run_ephemeral


@keel.task(name="eph_square")
def square(x: int) -> int:
    return x * x


@keel.task(name="eph_add")
def add(a: int, b: int) -> int:
    return a + b


@keel.task(name="eph_async_neg")
async def negate(x: int) -> int:
    await asyncio.sleep(0)
    return -x


@keel.task(name="eph_total")
def total(values: dict[str, list[int]]) -> int:
    return sum(values["items"])


@keel.task(name="eph_where")
def where() -> tuple[str, str | None, str]:
    ctx = keel.context()
    return ctx.run_id, ctx.step_key, threading.current_thread().name


@keel.task(name="eph_boom")
def boom(x: int) -> int:
    raise KeyError(x)


@keel.workflow(name="eph_child")
def child(x: int) -> int:
    return add(square(x), 1)


@keel.workflow(name="eph_body")
def body(n: int) -> dict[str, Any]:
    squares = square.map(range(n))
    later = add.submit(squares[1], squares[2])  # waits for two futures
    nested = total({"items": squares})  # futures inside a dict and a list
    return {
        "sum": nested,
        "pair": later.result(),
        "gathered": keel.gather(squares),
        "neg": negate(n),
        "child": child(n),
        "where": where(),
    }


@keel.workflow(name="eph_failing")
def failing() -> int:
    first = boom.submit(1)
    return add(first, 1)  # its input failed: the error reaches the body


@keel.workflow(name="eph_sleeper")
def sleeper() -> None:
    keel.sleep(1)


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def test_steps_run_in_memory_with_the_sdk_semantics(
    pool: ThreadPoolExecutor, keel_home: Path
) -> None:
    out = run_ephemeral(body, {"n": 5}, pool)
    assert out["sum"] == 30 and out["pair"] == 5 and out["gathered"] == [0, 1, 4, 9, 16]
    assert out["neg"] == -5 and out["child"] == 26
    run_id, step_key, _thread = out["where"]
    assert run_id.startswith("ephemeral-") and step_key.startswith("eph_where-")
    assert not keel_home.exists()  # no store was opened, let alone written


def test_errors_reach_the_caller_and_durable_waits_are_refused(pool: ThreadPoolExecutor) -> None:
    with pytest.raises(KeyError):
        run_ephemeral(failing, {}, pool)
    with pytest.raises(DefinitionError, match="durable wait"):
        run_ephemeral(sleeper, {}, pool)
    # The pool is still usable, and concurrent calls do not see each other's steps.
    with ThreadPoolExecutor(8) as callers:
        results = list(
            callers.map(lambda n: run_ephemeral(body, {"n": n}, pool)["sum"], range(3, 19))
        )
    assert results == [sum(i * i for i in range(n)) for n in range(3, 19)]
