"""B7 tracking: (a) N `keel.log_metric` calls (default 100,000) inside one step of a
workflow with one task, timed until the run has finished (every metric durable in
the store); (b) a filtered, ordered `keel.search_runs` over R runs (default 1,000)
with 10 params and 10 metrics each. Embedded SQLite store.

Baseline for (a), in the same run: the same N rows inserted into a table of the same
shape as keel_metrics, in the same database, with a plain SQLAlchemy Core
`conn.execute(table.insert(), rows)` executemany (rows built beforehand, one
transaction, a plain engine). On PostgreSQL the tables are ANALYZEd after the runs
for (b) are made, as autovacuum would do within a minute.
Targets: (a) >= 100,000 metrics/s end to end; (b) <= 100 ms for the search (median).

    python bench/b7_tracking.py [--n 100000] [--runs 1000] [--repeat 3] [--searches 20]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from typing import Any

from _common import Result, expect, fmt, fresh_home, parser, report, timed

import keel

TARGET_METRICS_PER_S = 100_000
TARGET_SEARCH_MS = 100.0
SEARCH_FILTER = "metrics.m0 > 0.5 and params.p1 IN ('a', 'b') and attributes.status = 'FINISHED'"
SEARCH_ORDER = ["metrics.m1 DESC"]


# -- (a) log_metric in a training loop ------------------------------------------------------


@keel.task(name="b7_train")
def train(n: int) -> int:
    for i in range(n):
        keel.log_metric("loss", 1.0 / (i + 1), step=i)
    return n


@keel.workflow(name="b7_logging")
def logging_run(n: int) -> int:
    return train(n)


def run_keel(n: int) -> str:
    handle = keel.run(logging_run, n=n)
    expect(handle.result(), n, "the step's result")
    return handle.id


def check_recorded(run_id: str, n: int) -> None:
    """Every metric of the run is in the store, and the latest value is the last one."""
    import sqlalchemy as sa

    from keel.store.schema import metrics

    store = keel.Client().store
    with store.engine.connect() as conn:
        count = conn.execute(
            sa.select(sa.func.count()).select_from(metrics).where(metrics.c.run_id == run_id)
        ).scalar()
    expect(count, n, "metric rows recorded")
    latest = keel.Client().run(run_id).step("b7_train").data.metrics
    expect(latest, {"loss": 1.0 / n}, "latest metric value")


def baseline_table() -> Any:
    """A table shaped like keel_metrics (columns, types, index), under another name."""
    import sqlalchemy as sa

    meta = sa.MetaData()
    return sa.Table(
        "b7_baseline_metrics",
        meta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("key", sa.String(250), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("is_nan", sa.Boolean, nullable=False, default=False),
        sa.Column("step", sa.Integer, nullable=False, default=0),
        sa.Column("timestamp", sa.Float, nullable=False),
        sa.Index("ix_b7_baseline_run_key", "run_id", "seq", "key", "step"),
    )


def run_baseline(n: int) -> float:
    """Seconds to insert N metric rows with a plain executemany (one transaction), in
    the same database as keel's store, through a plain engine of its own."""
    import sqlalchemy as sa

    engine = sa.create_engine(keel.Client().store.url)
    table = baseline_table()
    table.drop(engine, checkfirst=True)
    table.create(engine)
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "run_id": "baseline",
            "seq": 0,
            "key": "loss",
            "value": 1.0 / (i + 1),
            "is_nan": False,
            "step": i,
            "timestamp": now,
        }
        for i in range(n)
    ]

    def insert() -> None:
        with engine.begin() as conn:
            conn.execute(table.insert(), rows)

    seconds, _ = timed(insert)
    with engine.connect() as conn:
        expect(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar(), n, "rows")
    table.drop(engine)
    engine.dispose()
    return seconds


def measure_logging(n: int, repeat: int) -> tuple[float, float]:
    run_keel(min(n, 1000))  # warm-up: store creation, imports, first threads
    run_baseline(min(n, 1000))
    keel_times, base_times = [], []
    for _ in range(max(1, repeat)):
        seconds, run_id = timed(lambda: run_keel(n))
        check_recorded(run_id, n)
        keel_times.append(seconds)
        base_times.append(run_baseline(n))
    return statistics.median(keel_times), statistics.median(base_times)


# -- (b) search ----------------------------------------------------------------------------------


def make_runs(count: int) -> float:
    """`count` tracked runs with 10 params and 10 metrics each; seconds taken."""
    rng = random.Random(7)
    start = time.perf_counter()
    for i in range(count):
        with keel.start_run(experiment="b7-sweep", run_name=f"trial-{i}"):
            keel.log_params({f"p{k}": rng.choice("abcde") for k in range(10)})
            keel.log_metrics({f"m{k}": rng.random() for k in range(10)})
    return time.perf_counter() - start


def analyze() -> None:
    """Fresh statistics for PostgreSQL's planner (SQLite plans without them)."""
    import sqlalchemy as sa

    store = keel.Client().store
    if store.dialect == "postgresql":
        with store.engine.begin() as conn:
            conn.execute(sa.text("ANALYZE"))


def check_search(count: int) -> int:
    """The search's answer is the one computed in Python from every run's data."""
    frame = keel.search_runs("b7-sweep", filter=SEARCH_FILTER, order_by=SEARCH_ORDER)
    every = keel.search_runs("b7-sweep", max_results=count + 1, output_format="list")
    expect(len(every), count, "runs made")
    wanted = sorted(
        (r for r in every if r["metrics"]["m0"] > 0.5 and r["params"]["p1"] in ("a", "b")),
        key=lambda r: -r["metrics"]["m1"],
    )
    expect(list(frame["run_id"]), [r["run_id"] for r in wanted], "the search's answer")
    return len(wanted)


def measure_search(searches: int, filter: str = SEARCH_FILTER) -> list[float]:
    times = []
    for _ in range(max(1, searches)):
        seconds, _ = timed(
            lambda: keel.search_runs("b7-sweep", filter=filter, order_by=SEARCH_ORDER)
        )
        times.append(seconds)
    return times


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=100_000)
    p.add_argument("--runs", type=int, default=1_000, help="runs for the search (default 1,000)")
    p.add_argument("--searches", type=int, default=20, help="timed searches (default 20)")
    args = p.parse_args(argv)
    fresh_home(args.db_url, args.keep)
    n = args.n

    keel_s, base_s = measure_logging(n, args.repeat)
    keel_rate, base_rate = n / keel_s, n / base_s

    make_s = make_runs(args.runs)
    analyze()
    matched = check_search(args.runs)
    times = measure_search(args.searches)
    search_ms = statistics.median(times) * 1000
    fastest_ms = min(times) * 1000
    every_ms = statistics.median(measure_search(max(1, args.searches // 4), "")) * 1000

    report(
        f"B7 tracking: {n:,} log_metric calls in one step; search over {args.runs:,} runs "
        f"(median of {args.repeat} runs / {args.searches} searches)",
        [
            (
                "keel log_metric",
                f"{keel_s:.3f} s  {fmt(keel_rate, 'metrics/s')}  "
                f"{keel_s / n * 1e6:.2f} µs/metric, durable at run end",
            ),
            (
                "plain executemany",
                f"{base_s:.3f} s  {fmt(base_rate, 'rows/s')}  {base_s / n * 1e6:.2f} µs/row",
            ),
            ("rate ratio", f"keel logs at {keel_rate / base_rate:.2f}x the executemany's rate"),
            ("runs made", f"{args.runs:,} with start_run, 10 params + 10 metrics: {make_s:.2f} s"),
            ("search", f'filter "{SEARCH_FILTER}", order_by {SEARCH_ORDER}: {matched} runs'),
            ("search time", f"median {search_ms:.1f} ms, fastest {fastest_ms:.1f} ms"),
            ("every run, no filter", f"median {every_ms:.1f} ms for all {args.runs:,} rows"),
        ],
        [
            Result(
                "B7a",
                "metrics/s",
                keel_rate,
                base_rate,
                f">= {TARGET_METRICS_PER_S:,} metrics/s",
                keel_rate >= TARGET_METRICS_PER_S,
                baseline_name="executemany",
                extra={"n": n, "keel_s": keel_s, "baseline_s": base_s},
            ),
            Result(
                "B7b",
                "search ms",
                search_ms,
                None,
                f"<= {TARGET_SEARCH_MS:.0f} ms",
                search_ms <= TARGET_SEARCH_MS,
                unit="ms",
                extra={"runs": args.runs, "matched": matched, "fastest_ms": fastest_ms},
            ),
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
