"""B6 Ray: keel's Ray executor against plain Ray tasks, on one local 2-CPU Ray.

1. N steps (default 1,000) of 10 ms of CPU work each, fanned out with `map` on the
   Ray executor (durable recording on, embedded SQLite store), versus the same work
   as plain `ray.remote` tasks submitted at once and gathered with `ray.get`.
   Target: keel / plain Ray <= 1.3.
2. A 200 MB numpy array passed through three steps (make -> +1 -> +1, then a
   checksum) on the Ray executor, versus the same chain of plain Ray tasks passing
   ObjectRefs. keel also records each array durably (serialized, hashed, written to
   the artifact store by the worker); plain Ray keeps them in memory only. The
   coordinator's memory growth is printed: the arrays never pass through it.

Ray is started once by keel (`KEEL_RAY_NUM_CPUS=2`) and both sides use it; each
side is warmed up first so that worker start-up is not measured.

    python bench/b6_ray.py [--n 1000] [--repeat 3] [--mb 200]
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from _common import Result, expect, fresh_home, median_time, parser, report

os.environ["KEEL_RAY_NUM_CPUS"] = "2"
os.environ.pop("KEEL_RAY_ADDRESS", None)
os.environ.pop("RAY_ADDRESS", None)

import numpy as np

import keel

TARGET_RATIO = 1.3
WORK_SECONDS = 0.010
MB = 1024 * 1024


def burn(i: int) -> int:
    """10 ms of pure-Python CPU work."""
    deadline = time.perf_counter() + WORK_SECONDS
    while time.perf_counter() < deadline:
        pass
    return i


@keel.task(name="b6_burn")
def burn_step(i: int) -> int:
    return burn(i)


@keel.task(name="b6_sum")
def total(xs: list[int]) -> int:
    return sum(xs)


@keel.workflow(name="b6_fanout", executor="ray")
def fanout(n: int) -> int:
    return total(burn_step.map(range(n)))


def make_array(mb: int) -> np.ndarray:
    return np.ones(mb * MB // 8, dtype=np.float64)


def bump(arr: np.ndarray) -> np.ndarray:
    return arr + 1.0


def checksum(arr: np.ndarray) -> float:
    return float(arr[::4096].sum())


@keel.task(name="b6_make")
def make_step(mb: int) -> np.ndarray:
    return make_array(mb)


@keel.task(name="b6_bump")
def bump_step(arr: np.ndarray) -> np.ndarray:
    return bump(arr)


@keel.task(name="b6_checksum")
def checksum_step(arr: np.ndarray) -> float:
    return checksum(arr)


@keel.workflow(name="b6_array", executor="ray")
def array_chain(mb: int) -> float:
    arr = make_step.submit(mb)
    arr = bump_step.submit(arr)
    arr = bump_step.submit(arr)
    return checksum_step(arr)


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Call `fn`, sampling this process's resident memory; the value and the peak growth."""
    base = rss()
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        value = fn()
    finally:
        stop.set()
        sampler.join()
    return value, peak - base


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=1_000)
    p.add_argument("--mb", type=int, default=200, help="size of the array in part 2 (MB)")
    args = p.parse_args(argv)
    fresh_home(args.db_url, args.keep)
    n, mb = args.n, args.mb

    started = time.perf_counter()
    expect(keel.run(fanout, n=20).result(), sum(range(20)), "keel warm-up")  # starts Ray
    ray_start = time.perf_counter() - started
    import ray

    burn_remote = ray.remote(max_retries=0)(burn)

    def run_keel() -> int:
        return int(keel.run(fanout, n=n).result())

    def run_ray() -> int:
        return sum(ray.get([burn_remote.remote(i) for i in range(n)]))

    expect(run_ray(), sum(range(n)), "plain Ray warm-up")
    want = sum(range(n))
    keel_s = median_time(run_keel, args.repeat, lambda v: expect(v, want, "keel"))
    ray_s = median_time(run_ray, args.repeat, lambda v: expect(v, want, "plain Ray"))
    ideal = n * WORK_SECONDS / 2

    # -- part 2: a large array through three steps --------------------------------------
    make_r = ray.remote(max_retries=0)(make_array)
    bump_r = ray.remote(max_retries=0)(bump)
    checksum_r = ray.remote(max_retries=0)(checksum)

    def run_keel_array() -> float:
        return float(keel.run(array_chain, mb=mb).result())

    def run_ray_array() -> float:
        ref = make_r.remote(mb)
        ref = bump_r.remote(bump_r.remote(ref))
        return float(ray.get(checksum_r.remote(ref)))

    want_sum = 3.0 * len(range(0, mb * MB // 8, 4096))
    run_keel_array()  # warm-up: workers that import numpy
    run_ray_array()
    array_repeat = max(1, min(args.repeat, 3))
    keel_a = median_time(run_keel_array, array_repeat, lambda v: expect(v, want_sum, "keel"))
    ray_a = median_time(run_ray_array, array_repeat, lambda v: expect(v, want_sum, "plain Ray"))
    _, growth = peak_growth(run_keel_array)

    ratio = keel_s / ray_s
    report(
        f"B6 Ray: {n:,} steps of {WORK_SECONDS * 1000:.0f} ms CPU on a 2-CPU local Ray; "
        f"a {mb} MB array through 3 steps (median of {args.repeat})",
        [
            ("Ray start (first run)", f"{ray_start:.2f} s, paid once per process"),
            ("keel on Ray", f"{keel_s:.3f} s  {n / keel_s:,.0f} steps/s"),
            ("plain ray.remote", f"{ray_s:.3f} s  {n / ray_s:,.0f} tasks/s"),
            ("ideal (work / 2 CPUs)", f"{ideal:.3f} s"),
            (
                "keel overhead",
                f"{(keel_s - ray_s) / n * 1e3:.2f} ms/step over plain Ray "
                "(durable recording, engine, result round trip)",
            ),
            ("keel, array chain", f"{keel_a:.3f} s (3 arrays recorded durably)"),
            ("plain Ray, array chain", f"{ray_a:.3f} s (nothing recorded)"),
            ("coordinator memory", f"+{growth / MB:.0f} MB peak during the keel array chain"),
        ],
        [
            Result(
                "B6",
                "fan-out time",
                keel_s,
                ray_s,
                f"ratio <= {TARGET_RATIO}",
                ratio <= TARGET_RATIO,
                unit="s",
                baseline_name="plain Ray",
                extra={"n": n, "work_ms": WORK_SECONDS * 1000},
            ),
            Result(
                "B6",
                f"{mb} MB array x3 steps",
                keel_a,
                ray_a,
                "n/a (keel records each array)",
                None,
                unit="s",
                baseline_name="plain Ray",
                extra={"mb": mb, "coordinator_growth_mb": growth / MB},
            ),
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
