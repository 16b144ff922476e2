"""Workflows the CLI tests run (`keel run tests/cli_flows.py:<name>`)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import keel


@keel.task
def shout(word: str) -> str:
    print(f"shouting {word}")
    logging.getLogger("cli-flows").warning("about to shout %s", word)
    return word.upper()


@keel.task
def square(x: int) -> int:
    return x * x


@keel.task
def total(xs: list[int]) -> int:
    return sum(xs)


@keel.task(cache=True)
def slow_double(x: int) -> int:
    return 2 * x


@keel.task
def explode(x: int) -> int:
    raise ValueError(f"cannot handle {x}")


@keel.workflow
def greet(word: str = "hello", times: int = 1) -> list[str]:
    return [shout(word) for _ in range(times)]


@keel.workflow
def sum_squares(n: int) -> int:
    return total(square.map(range(n)))


@keel.workflow
def cached(x: int = 3) -> int:
    return slow_double(x)


@keel.workflow
def failing(x: int = 7) -> int:
    square(x)
    return explode(x)


@keel.workflow
def parent(n: int = 3) -> int:
    return sum_squares(n) + square(n)


@keel.task
def blob(n: int) -> str:
    return "x" * n


@keel.task
def pair(a: int) -> tuple[int, int]:
    return (a, a + 1)


@keel.workflow
def values(big: int = 100_000) -> int:
    pair(1)
    return len(blob(big))


@keel.task
def tick(control: str, i: int) -> int:
    # The test steers the pace through a file: slow until it has pressed Ctrl-C.
    path = Path(control)
    with path.with_suffix(".log").open("a") as f:
        f.write(f"{i}\n")
    if path.read_text().strip() == "slow":
        time.sleep(0.2)
    return i


@keel.workflow
def ticking(control: str, n: int = 300) -> int:
    # Slow, 300 steps take a minute: time enough for a test on a loaded machine to
    # interrupt or cancel the run before it ends by itself.
    return sum(tick(control, i) for i in range(n))


@keel.workflow
def failing_child() -> int:
    return failing(3) + 1


@keel.task
def make_lock() -> object:
    return threading.Lock()


@keel.workflow
def unserializable() -> object:
    return make_lock()
