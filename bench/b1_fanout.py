"""B1 fan-out: one workflow maps a trivial task over N inputs (default 10,000), then
a reduce sums them; durable recording on, embedded SQLite store.

Baseline, in the same run: a plain concurrent.futures.ThreadPoolExecutor (as many
threads as keel's default executor) making the same N trivial calls, then the sum.
Target: >= 10,000 steps/s (<= 100 µs per step).

    python bench/b1_fanout.py [--n 10000] [--repeat 3]
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from _common import Result, expect, fmt, fresh_home, median_time, parser, pool_workers, report

import keel

TARGET_STEPS_PER_S = 10_000


def trivial(i: int) -> int:
    return i


@keel.task(name="b1_item")
def item(i: int) -> int:
    return trivial(i)


@keel.task(name="b1_reduce")
def reduce(values: list[int]) -> int:
    return sum(values)


@keel.workflow(name="b1_fanout")
def fanout(n: int) -> int:
    return reduce(item.map(range(n)))


def run_keel(n: int) -> int:
    return int(keel.run(fanout, n=n).result())


def check_recorded(n: int) -> None:
    """The last run really recorded every step (durable recording was on)."""
    run = keel.Client().runs(workflow="b1_fanout", limit=1)[0]
    done = sum(1 for s in run.steps if s.status == "SUCCEEDED")
    expect(done, n + 1, "steps recorded as SUCCEEDED")


def run_pool(n: int, workers: int) -> int:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(trivial, i) for i in range(n)]
        return sum(f.result() for f in futures)


def measure(n: int, repeat: int) -> tuple[float, float]:
    """Median seconds for keel and for the baseline, each doing N calls and the sum."""
    want = n * (n - 1) // 2
    run_keel(min(n, 200))  # warm-up: store creation, imports, first threads
    keel_s = median_time(lambda: run_keel(n), repeat, lambda v: expect(v, want, "keel"))
    check_recorded(n)
    workers = pool_workers()
    run_pool(min(n, 200), workers)
    pool_s = median_time(lambda: run_pool(n, workers), repeat, lambda v: expect(v, want, "pool"))
    return keel_s, pool_s


def main(argv: list[str]) -> int:
    args = parser(__doc__.splitlines()[0], n=10_000).parse_args(argv)
    fresh_home(args.db_url, args.keep)
    n = args.n
    keel_s, pool_s = measure(n, args.repeat)
    steps = n + 1  # N mapped steps and the reduce
    keel_sps, pool_sps = steps / keel_s, steps / pool_s
    keel_us, pool_us = keel_s / steps * 1e6, pool_s / steps * 1e6
    report(
        f"B1 fan-out: {n:,} mapped trivial steps + 1 reduce, durable (median of {args.repeat})",
        [
            ("keel", f"{keel_s:.3f} s  {fmt(keel_sps, 'steps/s')}  {keel_us:.1f} µs/step"),
            (
                "ThreadPoolExecutor",
                f"{pool_s:.3f} s  {fmt(pool_sps, 'calls/s')}  {pool_us:.1f} µs/call",
            ),
            ("keel overhead", f"{keel_us - pool_us:.1f} µs/step over the bare pool"),
            ("time ratio", f"keel takes {keel_s / pool_s:.1f}x the pool's time"),
        ],
        [
            Result(
                "B1",
                "steps/s",
                keel_sps,
                pool_sps,
                f">= {TARGET_STEPS_PER_S:,} steps/s",
                keel_sps >= TARGET_STEPS_PER_S,
                baseline_name="ThreadPoolExecutor",
                extra={"n": n, "keel_us_per_step": keel_us, "pool_us_per_call": pool_us},
            )
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
