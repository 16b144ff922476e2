"""B2 chain: N dependent steps (default 1,000), each taking the previous step's
future as its input; durable recording on, embedded SQLite store.

Baseline, in the same run: the same chain on a plain ThreadPoolExecutor (submit,
wait for the result, submit the next). Target: <= 150 µs per step.

    python bench/b2_chain.py [--n 1000] [--repeat 3]
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from _common import Result, expect, fresh_home, median_time, parser, pool_workers, report

import keel

TARGET_US_PER_STEP = 150.0


def increment(x: int) -> int:
    return x + 1


@keel.task(name="b2_inc")
def inc(x: int) -> int:
    return increment(x)


@keel.workflow(name="b2_chain")
def chain(n: int) -> int:
    value = inc.submit(0)
    for _ in range(n - 1):
        value = inc.submit(value)  # a future as input: a dependency edge
    return value.result()


def run_keel(n: int) -> int:
    return int(keel.run(chain, n=n).result())


def run_pool(n: int, workers: int) -> int:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        value = 0
        for _ in range(n):
            value = pool.submit(increment, value).result()
        return value


def check_recorded(n: int) -> None:
    """The last run really recorded every step, each depending on the one before."""
    run = keel.Client().runs(workflow="b2_chain", limit=1)[0]
    steps = run.steps
    expect(sum(1 for s in steps if s.status == "SUCCEEDED"), n, "steps recorded as SUCCEEDED")
    expect(steps[-1].deps, [n - 2] if n > 1 else [], "deps of the last step")


def main(argv: list[str]) -> int:
    args = parser(__doc__.splitlines()[0], n=1_000).parse_args(argv)
    fresh_home(args.db_url, args.keep)
    n = args.n
    run_keel(min(n, 100))  # warm-up: store creation, imports, first threads
    keel_s = median_time(lambda: run_keel(n), args.repeat, lambda v: expect(v, n, "keel"))
    check_recorded(n)
    workers = pool_workers()
    run_pool(min(n, 100), workers)
    pool_s = median_time(lambda: run_pool(n, workers), args.repeat, lambda v: expect(v, n, "pool"))
    keel_us, pool_us = keel_s / n * 1e6, pool_s / n * 1e6
    report(
        f"B2 chain: {n:,} dependent trivial steps, durable (median of {args.repeat})",
        [
            ("keel", f"{keel_s:.3f} s  {keel_us:.1f} µs/step  {n / keel_s:,.0f} steps/s"),
            (
                "ThreadPoolExecutor",
                f"{pool_s:.3f} s  {pool_us:.1f} µs/call  {n / pool_s:,.0f} calls/s",
            ),
            ("keel overhead", f"{keel_us - pool_us:.1f} µs/step over submit-and-wait on the pool"),
        ],
        [
            Result(
                "B2",
                "µs/step",
                keel_us,
                pool_us,
                f"<= {TARGET_US_PER_STEP:.0f} µs/step",
                keel_us <= TARGET_US_PER_STEP,
                unit="µs",
                baseline_name="ThreadPoolExecutor",
                extra={"n": n},
            )
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
