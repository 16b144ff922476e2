"""B8 schedules: the delay from a schedule's tick to its run starting, and the time
to create a 1,000-interval backfill.

Delay: a `Worker` with its default settings runs in this process with the scheduler
hooked into its loop (as `keel worker` does); a schedule fires every second; the
delay of a tick is when its run's body started minus the tick's instant (its
logical date). Baseline in the same run: the same worker, with each run queued by
hand (`keel.submit`) at the exact tick instant by a sleeping loop, i.e. the
worker's own pick-up time with no scheduler in between.

Backfill: `keel.backfill` over 1,000 hourly intervals (runs, queue entries and ticks
in one transaction). Baseline: the same 1,000 runs queued one `keel.submit` at a time.

Targets: tick-to-start p50 <= 1 s; 1,000-interval backfill <= 1 s.

    python bench/b8_schedules.py [--ticks 20] [--n 1000] [--repeat 3] [--db-url URL]
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

from _common import Result, fresh_home, parser, report

TARGET_DELAY_S = 1.0
TARGET_BACKFILL_S = 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=1000, repeat=3)
    p.add_argument("--ticks", type=int, default=20, help="ticks measured (default 20)")
    args = p.parse_args(argv)
    fresh_home(args.db_url, args.keep)

    import keel
    import keel.scheduler.service  # the worker loop runs the scheduler (as `keel worker`)
    from keel.scheduler.worker import Worker
    from keel.store.metadata import open_store

    @keel.workflow(name="b8_stamp")
    def stamp(logical_date: str) -> float:
        """Returns when its body started."""
        return time.time()

    store = open_store()

    def started_at(run_id: str) -> float:
        return float(keel.Client(store=store).run(run_id).result())

    def wait_done(run_ids: list[str]) -> None:
        deadline = time.monotonic() + 60 + 5 * len(run_ids)
        while time.monotonic() < deadline:
            if all(store.get_run(r).status in ("SUCCEEDED", "FAILED") for r in run_ids):
                return
            time.sleep(0.05)
        raise SystemExit("runs did not finish in time")

    worker = Worker(store=store)  # default poll interval, lease and concurrency
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    # -- keel: a schedule firing every second ------------------------------------------
    keel.schedules.add("b8-every-second", stamp, every="1s", store=store)
    deadline = time.monotonic() + 60 + 3 * args.ticks
    scheduled: list[tuple[float, str]] = []
    while len(scheduled) < args.ticks + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        found = store.list_runs(workflow="b8_stamp", status="SUCCEEDED", limit=None)
        scheduled = sorted((r.logical_date, r.id) for r in found if r.schedule)
    keel.schedules.remove("b8-every-second", store=store)
    scheduled = scheduled[1 : args.ticks + 1]  # the first tick also warms the worker up
    if len(scheduled) < args.ticks:
        raise SystemExit(f"only {len(scheduled)} scheduled runs ended in time")
    delays = [started_at(run_id) - at for at, run_id in scheduled]

    # -- baseline: keel.submit at the tick instant -------------------------------------
    submitted: list[tuple[float, str]] = []
    for _ in range(args.ticks):
        tick = float(int(time.time()) + 1)
        time.sleep(max(0.0, tick - time.time()))
        iso = datetime.fromtimestamp(tick, UTC).isoformat()
        submitted.append((tick, keel.submit(stamp, logical_date=iso).id))
    wait_done([r for _, r in submitted])
    base_delays = [started_at(run_id) - at for at, run_id in submitted]
    worker.stop()
    thread.join(60)

    # -- a 1,000-interval backfill vs 1,000 keel.submit calls ------------------------
    start = datetime(2020, 1, 1, tzinfo=UTC)
    times = []
    for i in range(max(1, args.repeat)):
        lo = start + timedelta(hours=args.n * i)
        t0 = time.perf_counter()
        done = keel.backfill(stamp, lo, lo + timedelta(hours=args.n - 1), every="1h", store=store)
        times.append(time.perf_counter() - t0)
        if done.runs != args.n:
            raise SystemExit(f"the backfill made {done.runs} runs, expected {args.n}")
    backfill_s = statistics.median(times)
    t0 = time.perf_counter()
    for k in range(args.n):
        keel.submit(stamp, logical_date=(start + timedelta(hours=k)).isoformat())
    submit_s = time.perf_counter() - t0

    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    b50, b95 = percentile(base_delays, 0.5), percentile(base_delays, 0.95)
    report(
        f"B8 schedules ({store.dialect}): {args.ticks} ticks of an every-1s schedule, "
        f"a {args.n:,}-interval backfill",
        [
            (
                "tick -> start, scheduled",
                f"p50 {p50:.3f} s, p95 {p95:.3f} s, max {max(delays):.3f} s",
            ),
            ("tick -> start, submitted at the tick", f"p50 {b50:.3f} s, p95 {b95:.3f} s"),
            (
                "backfill",
                f"median {backfill_s:.3f} s of {len(times)} ({args.n / backfill_s:,.0f} runs/s)",
            ),
            (f"{args.n:,} x keel.submit", f"{submit_s:.3f} s ({args.n / submit_s:,.0f} runs/s)"),
        ],
        [
            Result(
                "B8",
                "tick->start p50 s",
                p50,
                b50,
                f"<= {TARGET_DELAY_S} s",
                p50 <= TARGET_DELAY_S,
                unit="s",
                baseline_name="submit at the tick",
            ),
            Result(
                "B8",
                "tick->start p95 s",
                p95,
                b95,
                "-",
                None,
                unit="s",
                baseline_name="submit at the tick",
            ),
            Result(
                "B8",
                f"backfill {args.n} s",
                backfill_s,
                submit_s,
                f"<= {TARGET_BACKFILL_S} s",
                backfill_s <= TARGET_BACKFILL_S,
                unit="s",
                baseline_name="keel.submit x n",
            ),
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
