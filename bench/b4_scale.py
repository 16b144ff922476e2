"""B4 scale: one workflow maps a trivial task over N inputs (default 100,000), then a
reduce; durable recording on, embedded SQLite store. Prints peak memory and steps/s.

Baselines, in the same run: B1's 10,000-step fan-out on keel (B4's steps/s must be
at least half of it) and a plain ThreadPoolExecutor making the same N calls.
Targets: peak memory (ru_maxrss of this process) <= 1 GiB; steps/s >= 0.5 x B1's.

    python bench/b4_scale.py [--n 100000] [--b1-n 10000] [--tracemalloc]
"""

from __future__ import annotations

import resource
import sys
import tracemalloc

from _common import Result, expect, fmt, fresh_home, parser, pool_workers, report, timed
from b1_fanout import run_keel, run_pool

import keel

TARGET_PEAK_BYTES = 1 << 30
TARGET_FRACTION_OF_B1 = 0.5


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=100_000, repeat=1)
    p.add_argument("--b1-n", type=int, default=10_000, help="size of the B1 reference run")
    p.add_argument(
        "--tracemalloc",
        action="store_true",
        help="also report Python's allocation peak during the big run (slows it down)",
    )
    args = p.parse_args(argv)
    fresh_home(args.db_url, args.keep)
    n, b1_n = args.n, args.b1_n
    run_keel(200)  # warm-up: store creation, imports, first threads
    rss_before = peak_rss_bytes()

    if args.tracemalloc:
        tracemalloc.start()
    keel_s, value = timed(lambda: run_keel(n))
    traced_peak = tracemalloc.get_traced_memory()[1] if args.tracemalloc else None
    tracemalloc.stop()
    rss_peak = peak_rss_bytes()  # before the baselines, which allocate too
    expect(value, n * (n - 1) // 2, "keel")
    run = keel.Client().runs(workflow="b1_fanout", limit=1)[0]
    expect(sum(1 for s in run.steps if s.status == "SUCCEEDED"), n + 1, "steps recorded")

    b1_s, value = timed(lambda: run_keel(b1_n))
    expect(value, b1_n * (b1_n - 1) // 2, "keel B1 reference")
    pool_s, value = timed(lambda: run_pool(n, pool_workers()))
    expect(value, n * (n - 1) // 2, "pool")

    sps, b1_sps, pool_sps = (n + 1) / keel_s, (b1_n + 1) / b1_s, (n + 1) / pool_s
    mib = 1 << 20
    lines = [
        ("keel", f"{keel_s:.2f} s  {fmt(sps, 'steps/s')}  {keel_s / (n + 1) * 1e6:.1f} µs/step"),
        ("keel, B1 size", f"{b1_s:.3f} s  {fmt(b1_sps, 'steps/s')} ({b1_n:,} steps)"),
        ("ThreadPoolExecutor", f"{pool_s:.2f} s  {fmt(pool_sps, 'calls/s')}"),
        ("peak RSS", f"{rss_peak / mib:.0f} MiB (was {rss_before / mib:.0f} MiB before the run)"),
    ]
    if traced_peak is not None:
        lines.append(("tracemalloc peak", f"{traced_peak / mib:.0f} MiB of Python allocations"))
    report(
        f"B4 scale: {n:,} mapped trivial steps + 1 reduce, durable",
        lines,
        [
            Result(
                "B4",
                "peak RSS MiB",
                rss_peak / mib,
                None,
                f"<= {TARGET_PEAK_BYTES // mib} MiB",
                rss_peak <= TARGET_PEAK_BYTES,
                unit="MiB",
                extra={"n": n, "rss_before_mib": rss_before / mib, "tracemalloc": traced_peak},
            ),
            Result(
                "B4",
                "steps/s",
                sps,
                b1_sps,
                f">= {TARGET_FRACTION_OF_B1:.1f}x B1's steps/s",
                sps >= TARGET_FRACTION_OF_B1 * b1_sps,
                baseline_name=f"keel at B1 size ({b1_n:,})",
                extra={"pool_steps_per_s": pool_sps},
            ),
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
