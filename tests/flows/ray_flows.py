"""Tasks and workflows for tests/test_ray.py.

They live in an importable module (not in the test file) because Ray workers import
a step's function by its module name: the test cluster puts tests/ on PYTHONPATH.
Steps that count their executions append one line per execution to a side-effect
file (one `write` in append mode, so concurrent writers never interleave).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

import keel
from keel.sdk.definitions import Resources


def append_line(path: str, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(f"{text}\n")
        fh.flush()


def node_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


# -- the same workflow on threads and on Ray ----------------------------------------------


@keel.task(name="ray_square")
def square(x: int) -> int:
    return x * x


@keel.task(name="ray_combine")
def combine(xs: list[int], label: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"label": label, "sum": sum(xs), "extra": extra, "pairs": [(x, -x) for x in xs]}


@keel.task(name="ray_fail")
def fail(x: int) -> int:
    raise ValueError(f"bad {x}")


@keel.task(name="ray_talk")
def talk(word: str) -> dict[str, Any]:
    ctx = keel.context()
    print(f"printed by {ctx.step_key}: {word}")
    print("to stderr", file=sys.stderr)
    ctx.logger.warning("logged by %s", ctx.step_key)
    return {"key": ctx.step_key, "attempt": ctx.attempt, "pid": os.getpid()}


@keel.workflow(name="ray_mixed")
def mixed(n: int) -> dict[str, Any]:
    squares = square.map(range(n))
    summary = combine(squares, label="squares", extra={"n": n, "nested": [1, [2, 3]]})
    try:
        fail(n)
    except ValueError as exc:
        caught = f"{type(exc).__name__}: {exc}"
    # A future nested in a container and a future passed by keyword.
    nested = combine.submit([squares[0], squares[-1]], label="ends", extra={"last": squares[-1]})
    return {
        "summary": summary,
        "nested": nested.result(),
        "caught": caught,
        "talk": talk("hello"),
        "last": square(squares[-1]),
    }


# -- placement ----------------------------------------------------------------------------


@keel.task(name="ray_where_stable", resources={"cpus": 1, "stable": 1})
def where_stable() -> str:
    return node_id()


@keel.task(name="ray_where_head", resources={"cpus": 0.5, "memory": 64 * 1024 * 1024, "head": 1})
def where_head() -> str:
    return node_id()


@keel.task(
    name="ray_env",
    executor_options={"runtime_env": {"env_vars": {"KEEL_RAY_TEST_VAR": "from runtime_env"}}},
)
def env_var() -> str | None:
    return os.environ.get("KEEL_RAY_TEST_VAR")


@keel.workflow(name="ray_placement")
def placement() -> dict[str, Any]:
    stable = [where_stable.submit() for _ in range(3)]
    head = [where_head.submit() for _ in range(3)]
    return {
        "stable": keel.gather(*stable),
        "head": keel.gather(*head),
        "env": env_var(),
    }


@keel.task(name="ray_square_where")
def square_where(x: int) -> dict[str, Any]:
    return {"square": x * x, "node": node_id()}


@keel.workflow(name="ray_small_stable")
def small_stable(n: int) -> dict[str, Any]:
    """Squares on the `stable` node of the test cluster (anywhere on a local Ray)."""
    task = square_where
    if not os.environ.get("KEEL_RAY_TEST_LOCAL"):
        task = task.with_options(resources=Resources(custom={"stable": 1}))
    results = keel.gather(*task.map(range(n)))
    nodes = {r["node"] for r in results}
    return {"square_sum": sum(r["square"] for r in results), "node": nodes.pop()}


@keel.task(name="ray_bad_option", executor_options={"no_such_option": 1})
def bad_option() -> int:
    return 1


@keel.workflow(name="ray_bad_options")
def bad_options() -> int:
    return bad_option()


# -- a large array passed by reference ----------------------------------------------------


@keel.task(name="ray_big_make", resources={"stable": 1})
def big_make(mb: int) -> np.ndarray:
    return np.arange(mb * 1024 * 1024 // 8, dtype=np.float64)


@keel.task(name="ray_big_use", resources={"head": 1})
def big_use(arr: np.ndarray) -> dict[str, Any]:
    # An array that Ray hands over zero-copy is a read-only view of its object store;
    # one read back from keel's artifact store would be an ordinary writeable array.
    return {
        "sum": float(arr.sum()),
        "nbytes": int(arr.nbytes),
        "writeable": bool(arr.flags.writeable),
        "node": node_id(),
    }


@keel.task(name="ray_big_plus_one", resources={"head": 1})
def big_plus_one(arr: np.ndarray) -> np.ndarray:
    return arr + 1.0


@keel.workflow(name="ray_big")
def big(mb: int) -> dict[str, Any]:
    made = big_make.submit(mb)
    keel.wait([made])
    handle = type(made.handle).__name__
    used = big_use.submit(made)
    bumped = big_plus_one.submit(made)
    used_again = big_use.submit(bumped)
    return {
        "handle": handle,
        "used": used.result(),
        "used_again": used_again.result(),
    }


# -- failures -----------------------------------------------------------------------------


@keel.task(name="ray_exit_once", retries=1, retry_delay=0.1)
def exit_once(out: str) -> str:
    ctx = keel.context()
    append_line(out, f"{ctx.step_key} {ctx.attempt}")
    if ctx.attempt == 1:
        os._exit(3)  # the worker process dies, as on a crash
    return f"survived on attempt {ctx.attempt}"


@keel.workflow(name="ray_worker_dies")
def worker_dies(out: str) -> str:
    return exit_once(out)


@keel.task(name="ray_sleepy", timeout=1.0)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


@keel.task(name="ray_stubborn", timeout=1.0)
def stubborn(seconds: float) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except BaseException:  # swallows even keel's stop signal: must be killed
            pass
    return "woke up"


@keel.workflow(name="ray_timeouts")
def timeouts(which: str, seconds: float) -> str:
    return (sleepy if which == "sleepy" else stubborn)(seconds)


def hold(seconds: float, until: str | None = None) -> None:
    """Waits `seconds`, or less once the file `until` exists (when one is named)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.02)


@keel.task(name="ray_hog", resources={"stable": 2})
def hog(i: int, out: str, seconds: float) -> int:
    """Takes the whole `stable` node, so the others wait in Ray's queue; runs for
    `seconds` or until the file `out`.release exists."""
    append_line(out, f"{keel.context().step_key} {keel.context().attempt}")
    hold(seconds, until=f"{out}.release")
    return i


@keel.workflow(name="ray_hogs", max_concurrency=8)
def hogs(n: int, out: str, seconds: float) -> list[int]:
    return keel.gather(*hog.map(range(n), out=out, seconds=seconds))


# -- the coordinator dies mid-run --------------------------------------------------------


@keel.task(name="ray_crash_step")
def crash_step(i: int, out: str, delay: float, gate: str = "", gate_from: int = 0) -> int:
    """Given a `gate` file, steps from `gate_from` on wait (bounded) until it exists."""
    append_line(out, keel.context().step_key or "")
    time.sleep(delay)
    if gate and i >= gate_from:
        hold(120, until=gate)
    return i * i


@keel.workflow(name="ray_crash", max_concurrency=4)
def crash(n: int, out: str, delay: float, gate: str = "") -> int:
    steps = crash_step.map(range(n), out=out, delay=delay, gate=gate, gate_from=n // 2)
    return sum(keel.gather(*steps))


# -- a node dies mid-run --------------------------------------------------------------------


@keel.task(name="ray_chunk", resources={"victim": 1})
def chunk(i: int, out: str) -> dict[str, Any]:
    ctx = keel.context()
    append_line(out, f"{ctx.step_key} {ctx.attempt} {node_id()}")
    # Big enough (> Ray's 100 KiB inline limit) to live in the node's object store.
    return {"i": i, "data": np.full(64 * 1024, float(i)), "node": node_id()}


@keel.task(name="ray_slow", resources={"pool": 1}, retries=2, retry_delay=0.2)
def slow(i: int, out: str, seconds: float, release_node: str = "") -> dict[str, Any]:
    """Runs for `seconds`; on the node `release_node`, only until the file `out`.release
    exists (the test's other node dies under the steps it runs, which must not end)."""
    ctx = keel.context()
    node = node_id()
    append_line(out, f"{ctx.step_key} {ctx.attempt} {node}")
    hold(seconds, until=f"{out}.release" if node == release_node else None)
    return {"i": i, "node": node_id(), "attempt": ctx.attempt}


@keel.task(name="ray_total", resources={"head": 1})
def total(chunks: list[dict[str, Any]], slows: list[dict[str, Any]], out: str) -> dict[str, Any]:
    ctx = keel.context()
    append_line(out, f"{ctx.step_key} {ctx.attempt} {node_id()}")
    return {
        "chunks": sum(float(c["data"].sum()) for c in chunks),
        "slows": sorted(s["i"] for s in slows),
    }


@keel.workflow(name="ray_node_dies")
def node_dies(out: str, n_slow: int, seconds: float, release_node: str = "") -> dict[str, Any]:
    chunks = chunk.map(range(2), out=out)
    keel.wait(chunks)  # the chunks live on the victim node from now on
    slows = slow.map(range(n_slow), out=out, seconds=seconds, release_node=release_node)
    result = total(chunks, slows, out=out)
    return {
        **result,
        "chunk_nodes": [c.result()["node"] for c in chunks],
        "slow_nodes": [s.result()["node"] for s in slows],
    }


@keel.task(name="ray_live_talker")
def live_talker(wait: float) -> bool:
    """Prints a line, waits (bounded) to find it in the store, prints another: whether
    the line was recorded while the step still ran on its Ray worker."""
    ctx = keel.context()
    print("first line from ray", flush=True)
    store = keel.Client().store
    deadline = time.monotonic() + wait
    seen = False
    while not seen and time.monotonic() < deadline:
        seen = any("first line from ray" in r.text for r in store.load_logs(ctx.run_id))
        time.sleep(0.05)
    print("second line from ray")
    return seen


@keel.workflow(name="ray_live_logs")
def live_logs(wait: float = 120.0) -> bool:
    return live_talker(wait)
