"""Run every benchmark (each in its own process, with its own temporary KEEL_HOME)
and print a summary table. `make bench` calls this.

    python bench/run_all.py            # the full sizes of the targets
    python bench/run_all.py --quick    # small sizes, for a smoke run
    python bench/run_all.py --only b1 b2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script, full-size arguments, quick arguments
BENCHES: list[tuple[str, list[str], list[str]]] = [
    ("b1_fanout.py", [], ["--n", "1000", "--repeat", "1"]),
    ("b2_chain.py", [], ["--n", "200", "--repeat", "1"]),
    ("b3_resume.py", [], ["--n", "2000", "--repeat", "1"]),
    ("b4_scale.py", [], ["--n", "5000", "--b1-n", "1000"]),
    ("b5_startup.py", [], ["--repeat", "3"]),
    ("b6_ray.py", [], ["--n", "200", "--repeat", "1", "--mb", "50"]),
    ("b7_tracking.py", [], ["--n", "10000", "--runs", "200", "--repeat", "1", "--searches", "5"]),
    ("b8_schedules.py", [], ["--ticks", "5", "--n", "200", "--repeat", "1"]),
    ("b9_workers.py", [], ["--n", "200", "--workers", "1", "2", "--leases", "2"]),
    ("b10_server.py", [], ["--runs", "10000", "--requests", "50", "--batches", "10"]),
    ("b11_serving_workflows.py", [], ["--requests", "300"]),
    ("b11_serving.py", [], ["--quick"]),
    ("b11_serving_ray.py", [], ["--requests", "300", "--rounds", "1"]),
]


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Run keel's benchmarks and summarize them.")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="prefixes of benches to run: b1 b3")
    args = p.parse_args(argv)
    results_file = Path(tempfile.mkstemp(prefix="keel-bench-", suffix=".jsonl")[1])
    print(
        f"keel benchmarks: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"
        + (" (quick sizes)" if args.quick else "")
    )
    failed: list[str] = []
    for script, full, quick in BENCHES:
        if args.only and not any(script.startswith(prefix) for prefix in args.only):
            continue
        cmd = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        cmd += ["--json", str(results_file)]
        print(f"\n$ {' '.join([Path(cmd[0]).name, *cmd[1:-2]])}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(script)

    rows = [json.loads(line) for line in results_file.read_text().splitlines() if line]
    results_file.unlink()
    header = ("bench", "figure", "keel", "baseline", "ratio", "target", "")
    table = [header] + [
        (
            r["bench"],
            r["metric"],
            fmt(r["keel"]),
            fmt(r["baseline"]) + (f" ({r['baseline_name']})" if r["baseline_name"] else ""),
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
            r["target"],
            r["verdict"],
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print("\nSummary")
    for i, row in enumerate(table):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))
    if failed:
        print(f"\nbenchmarks that did not finish: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
