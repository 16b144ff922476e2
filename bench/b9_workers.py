"""B9 workers: queue throughput with 1, 2 and 4 `keel worker` processes, and the time
a surviving worker takes to take over a dead worker's run after its lease expires.

Throughput, two figures per k worker processes (`python -m keel worker`, concurrency 4
each, started and registered before the clock starts):

- run: a workflow maps a trivial task declared with `queue="b9"` over N inputs
  (default 1,000); the workers claim the steps, run them and write their outcomes
  back; the run in this process queues the steps and records their outcomes. Timed
  from `keel.run` to its return (every step durable).
- backlog: N such steps already queued (held back until every worker is up, then
  released at once); the workers' own window, from the first attempt's start to the
  last attempt's end as recorded: steps claimed and completed per second.

Baseline in the same run: the same N steps of the same trivial function on the
in-process threads executor (the default).

Take-over: a submitted run of 200 steps of 50 ms is claimed by worker A (run on
A's threads); A is SIGKILLed midway; worker B, idle and serving the same queue, takes
the run over once A's lease has expired and continues it by replay. Measured: from
the kill to B's claim of the run, and to the first step B runs; the lease is printed
beside it (a claim is renewed every lease/3, so the take-over lies between 2/3 of
the lease and the whole lease, plus B's poll interval).

PostgreSQL by default (a fresh schema on KEEL_BENCH_PG_URL, else the local server's
`test` database, dropped at exit); `--db-url` names another store.

Claims against a backlog: one claim and completion at a time, with 1,000 and with
30,000 items queued (`--backlog`); a claim reads the queue in index order, so the
target is that the big backlog costs at most 1.5x the small one.

    python bench/b9_workers.py [--n 1000] [--workers 1 2 4] [--leases 2 5 10]
                               [--backlog 30000] [--db-url URL]
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import Result, fmt, fresh_home, parser, report

import keel

QUEUE = "b9"
TAKEOVER_QUEUE = "b9-runs"
BACKLOG_QUEUE = "b9-backlog"
CLAIM_QUEUE = "b9-claims"
PG_URL = os.environ.get("KEEL_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def trivial(i: int) -> int:
    return i


@keel.task(name="b9_queued", queue=QUEUE)
def queued(i: int) -> int:
    return trivial(i)


@keel.task(name="b9_backlog", queue=BACKLOG_QUEUE)
def backlog(i: int) -> int:
    return trivial(i)


@keel.workflow(name="b9_backlog_fanout", max_concurrency=100_000)
def backlog_fanout(n: int) -> int:
    """Every step queued at once (no concurrency limit): a backlog for the workers."""
    return sum(keel.gather(backlog.map(range(n))))


@keel.task(name="b9_local")
def local(i: int) -> int:
    return trivial(i)


@keel.workflow(name="b9_queued_fanout", max_concurrency=256)
def queued_fanout(n: int) -> int:
    return sum(keel.gather(queued.map(range(n))))


@keel.workflow(name="b9_local_fanout")
def local_fanout(n: int) -> int:
    return sum(keel.gather(local.map(range(n))))


@keel.task(name="b9_slow")
def slow(i: int, out: str) -> int:
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(0.05)
    return i


@keel.workflow(name="b9_takeover", queue=TAKEOVER_QUEUE, max_concurrency=2)
def takeover(out: str, n: int = 200) -> int:
    return sum(keel.gather(slow.map(range(n), out=out)))


# -- set-up -----------------------------------------------------------------------------
def pg_schema_url() -> str | None:
    """A fresh schema on the benchmark PostgreSQL (dropped at exit), or None."""
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(PG_URL, poolclass=sa.pool.NullPool)
        schema = f"b9_{uuid.uuid4().hex[:10]}"
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        print(f"PostgreSQL unreachable at {PG_URL}: {str(exc).splitlines()[0]}")
        return None

    def drop() -> None:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))

    atexit.register(drop)
    return f"{PG_URL}?options=-csearch_path%3D{schema}"


class Workers:
    """k `keel worker` processes on this benchmark's store."""

    def __init__(
        self,
        k: int,
        queue: str,
        *,
        lease: float | None = None,
        concurrency: int = 4,
        label: str = "",
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        home = Path(os.environ["KEEL_HOME"])
        for i in range(k):
            args = [sys.executable, "-m", "keel", "worker", "--no-scheduler", "--queue", queue]
            args += ["--concurrency", str(concurrency)]
            if lease is not None:
                args += ["--lease", str(lease)]
            log = open(home / f"worker-{label}{i}.log", "wb")  # noqa: SIM115
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))
        atexit.register(self.stop)

    def wait_registered(self, store: Any) -> None:
        from keel.store import queue as work_queue

        pids = {p.pid for p in self.procs}
        deadline = time.monotonic() + 120
        while {w.pid for w in work_queue.live_workers(store)} & pids != pids:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit("the worker processes did not start (see KEEL_HOME/worker-*.log)")
            time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def worker_window(store: Any, run_id: str) -> float:
    """First attempt start to last attempt end, as the workers timed the steps."""
    import sqlalchemy as sa

    from keel.store.schema import attempts

    with store.engine.connect() as conn:
        first, last = conn.execute(
            sa.select(sa.func.min(attempts.c.started_at), sa.func.max(attempts.c.ended_at)).where(
                attempts.c.run_id == run_id
            )
        ).one()
    return float(last - first)


def run_claimer(store: Any, run_id: str) -> str | None:
    """The worker id holding the run's queue entry."""
    import sqlalchemy as sa

    from keel.store.schema import queue_items

    with store.engine.connect() as conn:
        found = conn.execute(
            sa.select(queue_items.c.claimed_by).where(queue_items.c.dedupe == f"run:{run_id}")
        ).scalar()
    return None if found is None else str(found)


def expect_recorded(store: Any, run_id: str, n: int) -> None:
    steps = store.load_steps(run_id)
    done = sum(1 for s in steps if s.status == "SUCCEEDED")
    if done != n:
        raise SystemExit(f"run {run_id}: {done} steps recorded as SUCCEEDED, expected {n}")


# -- measurements -----------------------------------------------------------------------
def end_to_end(store: Any, n: int, k: int, concurrency: int) -> float:
    """Seconds for a run of N queued steps on k workers, from `keel.run` to its end."""
    workers = Workers(k, QUEUE, concurrency=concurrency, label=f"k{k}-")
    try:
        workers.wait_registered(store)
        keel.run(queued_fanout, n=min(n, 50))  # warm-up: each worker's first claims
        start = time.perf_counter()
        handle = keel.run(queued_fanout, n=n)
        seconds = time.perf_counter() - start
        if handle.result() != n * (n - 1) // 2:
            raise SystemExit("wrong result for the queued fan-out")
        expect_recorded(store, handle.id, n)
        return seconds
    finally:
        workers.stop()


def _set_backlog_due(store: Any, not_before: float) -> int:

    from keel.store.schema import queue_items

    with store.engine.begin() as conn:
        return int(
            conn.execute(
                queue_items.update()
                .where(queue_items.c.queue == BACKLOG_QUEUE, queue_items.c.status == "queued")
                .values(not_before=not_before)
            ).rowcount
        )


def drain(store: Any, n: int, k: int, concurrency: int) -> float:
    """Seconds for k workers to claim and complete a backlog of N queued steps (the
    workers' own window: first attempt start to last attempt end)."""
    import threading

    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(h=keel.run(backlog_fanout, n=n)))
    thread.start()
    deadline = time.monotonic() + 300
    # Hold every step back until all are queued and all workers are up, then release
    # them at once (this script sets their not_before; workers never see them early).
    while _set_backlog_due(store, time.time() + 1e6) < n:
        if time.monotonic() > deadline:
            raise SystemExit("the backlog was not queued in time")
        time.sleep(0.05)
    workers = Workers(k, BACKLOG_QUEUE, concurrency=concurrency, label=f"d{k}-")
    try:
        workers.wait_registered(store)
        _set_backlog_due(store, 0.0)
        thread.join(600)
        handle = box.get("h")
        if handle is None or handle.result() != n * (n - 1) // 2:
            raise SystemExit("the backlog run failed")
        expect_recorded(store, handle.id, n)
        return worker_window(store, handle.id)
    finally:
        workers.stop()


def baseline(store: Any, n: int) -> float:
    keel.run(local_fanout, n=min(n, 50))
    start = time.perf_counter()
    handle = keel.run(local_fanout, n=n)
    seconds = time.perf_counter() - start
    if handle.result() != n * (n - 1) // 2:
        raise SystemExit("wrong result for the in-process fan-out")
    expect_recorded(store, handle.id, n)
    return seconds


def take_over(store: Any, lease: float) -> tuple[float, float]:
    """Seconds from SIGKILLing the worker running a run to the survivor's claim of it,
    and to the first step the survivor runs."""
    out = Path(os.environ["KEEL_HOME"]) / f"takeover-{lease:g}.txt"
    handle = keel.submit(takeover, out=str(out))
    first = Workers(1, TAKEOVER_QUEUE, lease=lease, label=f"a{lease:g}-")
    victim = first.procs[0]
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_text().splitlines()) < 20:
        if time.monotonic() > deadline:
            raise SystemExit("worker A did not start the run")
        time.sleep(0.01)
    survivor = Workers(1, TAKEOVER_QUEUE, lease=lease, label=f"b{lease:g}-")
    survivor.wait_registered(store)
    killed = time.perf_counter()
    victim.kill()
    victim.wait()
    claimed_at = ran_at = None
    pid = survivor.procs[0].pid
    deadline = time.monotonic() + 10 * lease + 60
    while ran_at is None and time.monotonic() < deadline:
        if claimed_at is None and f":{pid}:" in (run_claimer(store, handle.id) or ""):
            claimed_at = time.perf_counter()
        if str(pid) in out.read_text().split():
            ran_at = time.perf_counter()
            claimed_at = claimed_at or ran_at
        time.sleep(0.005)
    if ran_at is None or claimed_at is None:
        raise SystemExit(f"worker B did not take the run over within {10 * lease + 60:.0f} s")
    deadline = time.monotonic() + 120
    while store.get_run(handle.id).status != "SUCCEEDED":
        if time.monotonic() > deadline:
            raise SystemExit("the taken-over run did not finish")
        time.sleep(0.05)
    survivor.stop()
    return claimed_at - killed, ran_at - killed


def claim_latency(store: Any, backlog: int, claims: int = 200) -> float:
    """Seconds per claim and completion of one item with `backlog` items queued (in
    three priorities) on a queue of its own; the items are removed afterwards."""
    import sqlalchemy as sa

    from keel.store import queue
    from keel.store.schema import queue_items

    run_id = f"b9-claims-{backlog}"
    items = [queue.StepItem(run_id, i, 1, CLAIM_QUEUE, i % 3, None, b"x") for i in range(backlog)]
    for start in range(0, backlog, 5000):
        queue.enqueue_steps(store, items[start : start + 5000])
    if store.dialect == "postgresql":
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE keel_queue")
    try:
        begin = time.perf_counter()
        for _ in range(claims):
            claim = queue.claim(store, "b9-claimer", [CLAIM_QUEUE], lease_seconds=60)
            if claim is None or not queue.complete(store, claim.id, "b9-claimer", b"ok"):
                raise SystemExit("a claim of the backlog failed")
        return (time.perf_counter() - begin) / claims
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.delete(queue_items).where(queue_items.c.run_id == run_id))


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=1000, repeat=1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts")
    p.add_argument(
        "--leases", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="leases (seconds)"
    )
    p.add_argument(
        "--concurrency", type=int, default=4, help="items per worker at once (default 4)"
    )
    p.add_argument("--backlog", type=int, default=30_000, help="queued items for the claim figure")
    args = p.parse_args(argv)
    url = args.db_url or pg_schema_url()
    fresh_home(url, args.keep)
    backend = "PostgreSQL" if url and url.startswith("postgresql") else "SQLite"
    from keel.store.metadata import open_store

    store = open_store()
    n = args.n
    base_s = baseline(store, n)
    base_sps = n / base_s
    lines = [("store", backend), ("threads executor (in-process)", f"{fmt(base_sps, 'steps/s')}")]
    results: list[Result] = []
    for k in args.workers:
        run_s = end_to_end(store, n, k, args.concurrency)
        drain_s = drain(store, n, k, args.concurrency)
        run_sps, drain_sps = n / run_s, n / drain_s
        workers = f"{k} worker{'s' if k > 1 else ''}"
        lines.append(
            (
                workers,
                f"run {run_s:.2f} s = {fmt(run_sps, 'steps/s')}; "
                f"backlog drained in {drain_s:.2f} s = {fmt(drain_sps, 'steps/s')}",
            )
        )
        for metric, value in (
            (f"run steps/s, {workers}", run_sps),
            (
                f"backlog steps/s, {workers}",
                drain_sps,
            ),
        ):
            results.append(
                Result(
                    "B9",
                    metric,
                    value,
                    base_sps,
                    "scales with workers (no target)",
                    None,
                    unit="steps/s",
                    baseline_name="threads executor",
                    extra={
                        "n": n,
                        "workers": k,
                        "concurrency": args.concurrency,
                        "backend": backend,
                    },
                )
            )
    for lease in args.leases:
        claim_s, first_step_s = take_over(store, lease)
        lines.append(
            (
                f"take-over, lease {lease:g} s",
                f"claimed {claim_s:.2f} s after the kill; first step {first_step_s:.2f} s",
            )
        )
        results.append(
            Result(
                "B9",
                f"take-over after kill, lease {lease:g} s",
                claim_s,
                lease,
                f"<= lease + 1 s ({lease + 1:g} s)",
                claim_s <= lease + 1,
                unit="s",
                baseline_name="lease",
                extra={"first_step_s": first_step_s, "backend": backend},
            )
        )
    small, big = (claim_latency(store, size) for size in (1_000, args.backlog))
    lines.append(
        (
            "claim + complete",
            f"{small * 1000:.2f} ms with 1,000 queued; "
            f"{big * 1000:.2f} ms with {args.backlog:,} queued",
        )
    )
    results.append(
        Result(
            "B9",
            f"claim + complete with {args.backlog:,} queued",
            big * 1000,
            small * 1000,
            "<= 1.5x the time with 1,000 queued",
            big <= 1.5 * small,
            unit="ms",
            baseline_name="1,000 queued",
            extra={"backend": backend},
        )
    )
    title = (
        f"B9 workers: {n:,} trivial queued steps; take-over of a dead worker's run; "
        "claims against a backlog"
    )
    report(title, lines, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
