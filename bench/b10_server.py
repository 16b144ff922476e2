"""B10 server: `keel server` start-up, the runs list at 100,000 runs (p50/p99) and metric
ingestion through the REST API, each beside a real `mlflow server` on the same store
type (SQLite) started in the same run.

- Ready: from starting the process to the first answer of its health endpoint.
- Runs list: both stores hold N runs (written straight into each one's own table, as
  a year of runs would be), then the newest page of 50 is asked for repeatedly over one
  kept-alive connection: keel `GET /api/v1/runs?limit=50`, MLflow `POST
  /api/2.0/mlflow/runs/search` with `max_results=50` (its default order, newest first).
- Ingestion: `POST /api/2.0/mlflow/runs/log-batch` with 1,000 metric points per request
  (MLflow's limit), the same requests to both servers; every point is checked in the
  store afterwards.
- Single metric: `MlflowClient().log_metric` (the real client, one kept-alive
  connection), one point per call, p50/p99. A server that writes a reply in pieces
  without TCP_NODELAY stalls each call on the client's delayed ACK (~40 ms).

Targets: ready <= 3 s; runs-list p50 <= 50 ms at 100,000 runs; ingestion >= 50,000
metrics/s; single-metric p50 <= 20 ms (no delayed-ACK stall). `mlflow server` needs
the full `mlflow` package (`pip install -e '.[bench]'`, which `make bench` does);
without it the MLflow columns are left empty.

    python bench/b10_server.py [--runs 100000] [--requests 200] [--batches 50] [--no-mlflow]
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Result, expect, fresh_home, parser, report

TARGET_READY_S = 3.0
TARGET_LIST_P50_MS = 50.0
TARGET_INGEST = 50_000.0
TARGET_SINGLE_P50_MS = 20.0  # a delayed-ACK stall alone is ~40 ms
PAGE = 50
BATCH = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Server:
    """A server process started here; `ready_s` is its time to the first healthy answer."""

    def __init__(self, args: list[str], health: str, cwd: Path, env: dict[str, str]) -> None:
        import httpx

        self.log_path = cwd / f"{Path(args[0]).name}-{args[1] if len(args) > 1 else ''}.log"
        with open(self.log_path, "wb") as log:
            start = time.perf_counter()
            self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{args[:3]} exited with {self.proc.returncode}; see {self.log.name}"
                )
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{args[:3]} did not answer {health} within 180 s")
            time.sleep(0.02)
        self.ready_s = time.perf_counter() - start

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def latencies(call: Callable[[], Any], requests: int) -> list[float]:
    """Milliseconds of each of `requests` calls, after 5 unmeasured ones."""
    for _ in range(5):
        call()
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def ingest(client: Any, batches: int) -> tuple[float, str]:
    """Seconds to send `batches` log-batch requests of 1,000 points to a new run; its id."""
    experiment = client.post(
        "/api/2.0/mlflow/experiments/create", json={"name": f"b10-{time.time_ns()}"}
    ).json()["experiment_id"]
    run_id = client.post(
        "/api/2.0/mlflow/runs/create",
        json={"experiment_id": experiment, "start_time": int(time.time() * 1000)},
    ).json()["run"]["info"]["run_id"]
    now = int(time.time() * 1000)
    bodies = [
        {
            "run_id": run_id,
            "metrics": [
                {
                    "key": "loss",
                    "value": 1.0 / (b * BATCH + i + 1),
                    "timestamp": now,
                    "step": b * BATCH + i,
                }
                for i in range(BATCH)
            ],
        }
        for b in range(batches)
    ]
    start = time.perf_counter()
    for body in bodies:
        reply = client.post("/api/2.0/mlflow/runs/log-batch", json=body)
        if reply.status_code != 200:
            raise SystemExit(f"log-batch answered {reply.status_code}: {reply.text[:300]}")
    return time.perf_counter() - start, run_id


def single_metric(url: str, requests: int) -> list[float]:
    """Milliseconds of each `MlflowClient.log_metric` call against the server at `url`
    (one point each, to a new run); every point is counted afterwards."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    experiment = client.create_experiment(f"b10-single-{time.time_ns()}")
    run_id = client.create_run(experiment).info.run_id
    step = iter(range(10**9))
    times = latencies(lambda: client.log_metric(run_id, "one", 1.0, step=next(step)), requests)
    expect(len(client.get_metric_history(run_id, "one")), requests + 5, "single points")
    return times


def measure(
    url: str, page: Callable[[Any], None], requests: int, batches: int
) -> tuple[list[float], float, str, list[float]]:
    """One server's figures: runs-list latencies (`page` asks for the first page over
    the kept-alive client), log-batch seconds and the run they went to, single-metric
    latencies."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as client:
        listed = latencies(lambda: page(client), requests)
        ingest_s, run_id = ingest(client, batches)
    return listed, ingest_s, run_id, single_metric(url, requests)


def keel_page(client: Any) -> None:
    page = client.get("/api/v1/runs", params={"limit": PAGE}).json()
    expect(len(page["runs"]), PAGE, "runs on keel's first page")


def mlflow_page(client: Any) -> None:
    found = client.post(
        "/api/2.0/mlflow/runs/search", json={"experiment_ids": ["0"], "max_results": PAGE}
    ).json()
    expect(len(found["runs"]), PAGE, "runs on MLflow's first page")


def fill_keel(n: int) -> None:
    from keel.store.metadata import open_store

    store = open_store()
    columns = "id, workflow, status, created_at, cancel_requested, kind, lifecycle_stage"
    sql = (
        f"INSERT INTO keel_runs ({columns}) WITH RECURSIVE c(i) AS "
        f"(SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < {n - 1}) "
        "SELECT printf('b10r%07d', i), 'wf' || (i % 10), "
        "CASE WHEN i % 3 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END, "
        "1.7e9 + i / 2.0, 0, 'workflow', 'active' FROM c"
    )
    with store.engine.begin() as conn:
        conn.exec_driver_sql(sql)
        conn.exec_driver_sql("ANALYZE")


def fill_mlflow(db: Path, n: int) -> None:
    import sqlite3

    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
            "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
            "artifact_uri, experiment_id) WITH RECURSIVE c(i) AS "
            f"(SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i < {n - 1}) "
            "SELECT printf('b10r%028d', i), 'run' || i, 'LOCAL', '', '', 'bench', "
            "CASE WHEN i % 3 = 0 THEN 'FAILED' ELSE 'FINISHED' END, "
            "1700000000000 + i * 500, 1700000000000 + i * 500 + 100, '', 'active', "
            "'/tmp/none', 0 FROM c"
        )
        conn.execute("ANALYZE")


def count_metrics_keel(run_id: str) -> int:
    import sqlalchemy as sa

    from keel.store.metadata import open_store
    from keel.store.schema import metrics

    with open_store().engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(metrics).where(metrics.c.run_id == run_id)
            ).scalar_one()
        )


def count_metrics_mlflow(db: Path, run_id: str) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(
            conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?", (run_id,)).fetchone()[0]
        )


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=100_000, repeat=1)
    p.add_argument("--runs", type=int, default=100_000, help="runs in each store (default 100,000)")
    p.add_argument(
        "--requests", type=int, default=200, help="timed runs-list requests (default 200)"
    )
    p.add_argument(
        "--batches", type=int, default=50, help="log-batch requests of 1,000 (default 50)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="skip the mlflow server baseline")
    args = p.parse_args(argv)
    if args.db_url:
        raise SystemExit("b10 compares both servers on SQLite; --db-url is not supported here")
    home = fresh_home(None, args.keep)

    env = dict(os.environ)
    # The store exists (and holds its runs) before the clock starts, as on any machine
    # that has used keel for a while. Each server is measured alone: on a small machine
    # the other's start-up would take the CPU.
    fill_keel(args.runs)
    keel_url = f"http://127.0.0.1:{free_port()}"
    keel_server = Server(
        [sys.executable, "-m", "keel", "server", "--port", keel_url.rsplit(":", 1)[1]],
        f"{keel_url}/api/v1/health",
        home,
        env,
    )
    try:
        keel_lat, keel_ingest_s, keel_run, keel_single = measure(
            keel_url, keel_page, args.requests, args.batches
        )
    finally:
        keel_server.stop()
    expect(count_metrics_keel(keel_run), args.batches * BATCH, "metric points in keel")

    mlflow_server: Server | None = None
    ml_lat: list[float] = []
    ml_single: list[float] = []
    ml_ingest_s: float | None = None
    mlflow = Path(sys.executable).parent / "mlflow"
    if not args.no_mlflow and mlflow.exists():
        mlflow_db = home / "mlflow.db"
        mlflow_url = f"http://127.0.0.1:{free_port()}"
        mlflow_server = Server(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                f"sqlite:///{mlflow_db}",
                "--default-artifact-root",
                str(home / "mlflow-artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                mlflow_url.rsplit(":", 1)[1],
            ],
            f"{mlflow_url}/health",
            home,
            env,
        )
        try:
            fill_mlflow(mlflow_db, args.runs)  # its schema exists once it answers
            time.sleep(5)  # let its other worker processes finish starting
            ml_lat, ml_ingest_s, ml_run, ml_single = measure(
                mlflow_url, mlflow_page, args.requests, args.batches
            )
        finally:
            mlflow_server.stop()
        expect(count_metrics_mlflow(mlflow_db, ml_run), args.batches * BATCH, "points in MLflow")

    points = args.batches * BATCH
    keel_rate = points / keel_ingest_s
    ml_rate = points / ml_ingest_s if ml_ingest_s else None
    keel_p50, keel_p99 = statistics.median(keel_lat), percentile(keel_lat, 0.99)
    ml_p50 = statistics.median(ml_lat) if ml_lat else None
    ml_p99 = percentile(ml_lat, 0.99) if ml_lat else None
    ml_ready = mlflow_server.ready_s if mlflow_server is not None else None
    one_p50, one_p99 = statistics.median(keel_single), percentile(keel_single, 0.99)
    ml_one_p50 = statistics.median(ml_single) if ml_single else None
    ml_one_p99 = percentile(ml_single, 0.99) if ml_single else None
    lines = [
        ("keel server ready", f"{keel_server.ready_s:.2f} s"),
        ("mlflow server ready", f"{ml_ready:.2f} s" if ml_ready else "not run"),
        (
            f"runs list, {args.runs:,} runs",
            f"keel p50 {keel_p50:.1f} ms p99 {keel_p99:.1f} ms"
            + (f" | mlflow p50 {ml_p50:.1f} ms p99 {ml_p99:.1f} ms" if ml_p50 else ""),
        ),
        (
            f"ingestion, {args.batches} x {BATCH:,}",
            f"keel {keel_rate:,.0f} metrics/s"
            + (f" | mlflow {ml_rate:,.0f} metrics/s" if ml_rate else ""),
        ),
        (
            "single log_metric (MlflowClient)",
            f"keel p50 {one_p50:.1f} ms p99 {one_p99:.1f} ms"
            + (f" | mlflow p50 {ml_one_p50:.1f} ms p99 {ml_one_p99:.1f} ms" if ml_one_p50 else ""),
        ),
    ]
    results = [
        Result(
            "B10", "ready s", keel_server.ready_s, ml_ready, f"<= {TARGET_READY_S:g} s",
            keel_server.ready_s <= TARGET_READY_S, "s", "mlflow server",
        ),
        Result(
            "B10", "runs-list p50 ms", keel_p50, ml_p50, f"<= {TARGET_LIST_P50_MS:g} ms",
            keel_p50 <= TARGET_LIST_P50_MS, "ms", "mlflow server",
            extra={"runs": args.runs, "keel_p99_ms": keel_p99, "mlflow_p99_ms": ml_p99},
        ),
        Result(
            "B10", "ingestion metrics/s", keel_rate, ml_rate, f">= {TARGET_INGEST:,.0f} metrics/s",
            keel_rate >= TARGET_INGEST, "", "mlflow server",
        ),
        Result(
            "B10", "single log_metric p50 ms", one_p50, ml_one_p50,
            f"<= {TARGET_SINGLE_P50_MS:g} ms", one_p50 <= TARGET_SINGLE_P50_MS, "ms",
            "mlflow server", extra={"keel_p99_ms": one_p99, "mlflow_p99_ms": ml_one_p99},
        ),
    ]  # fmt: skip
    report(
        f"B10 server: start-up, runs list at {args.runs:,} runs, ingestion through REST, "
        "single metrics",
        lines,
        results,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
