"""B3 resume: a run of N steps (default 10,000 mapped steps + a reduce) runs in a
subprocess that is killed with SIGKILL at about 90 %; the run is then resumed here
with `keel.resume`. Durable recording on, embedded SQLite store.

The figure is the resume's wall time minus the remaining steps' own work; that work
is the baseline, measured in the same run: a plain ThreadPoolExecutor making as many
calls of the step function as the resume had steps left to run. Target: the resume
takes <= 1 s more than that work.

Each step appends its index to a side-effect file (which is how the parent sees the
run reach 90 %, and how it counts what the resume really ran).

    python bench/b3_resume.py [--n 10000] [--repeat 3] [--kill-at 0.9]
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import Result, expect, fresh_home, parser, pool_workers, report, timed

import keel

TARGET_OVERHEAD_S = 1.0
WAIT_S = 600.0


def tick_body(i: int, out: str, delay: float) -> int:
    with open(out, "a", encoding="utf-8") as fh:
        fh.write(f"{i}\n")
    if delay:
        time.sleep(delay)
    return i


@keel.task(name="b3_tick")
def tick(i: int, out: str, delay: float) -> int:
    return tick_body(i, out, delay)


@keel.task(name="b3_total")
def total(values: list[int]) -> int:
    return sum(values)


@keel.workflow(name="b3_resume")
def resumable(n: int, out: str, delay: float = 0.0) -> int:
    return total(tick.map(range(n), out=out, delay=delay))


def bytes_for_lines(count: int) -> int:
    """Size of the side-effect file once steps 0..count-1 wrote their line."""
    return sum(len(str(i)) + 1 for i in range(count))


def run_and_kill(n: int, kill_at: float, delay: float, effects: Path) -> str:
    """Start the run in a subprocess, SIGKILL it at about `kill_at`; return its id."""
    before = {r.id for r in keel.Client().runs(workflow="b3_resume", limit=None)}
    args = [sys.executable, __file__, "--child", "--n", str(n), "--out", str(effects)]
    args += ["--delay", str(delay)]
    proc = subprocess.Popen(args, env=dict(os.environ))
    threshold = bytes_for_lines(int(n * kill_at))
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            size = effects.stat().st_size
        except FileNotFoundError:
            size = 0
        if size >= threshold:
            break
        if proc.poll() is not None:
            raise SystemExit(
                f"the run ended (exit code {proc.returncode}) before it reached "
                f"{kill_at:.0%}; try a larger --n or a --delay"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the run did not reach {kill_at:.0%} within {WAIT_S:.0f} s")
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()  # reap it: a zombie would still look alive to resume
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the run was not killed: it ended with exit code {proc.returncode}")
    (run,) = [r for r in keel.Client().runs(workflow="b3_resume", limit=None) if r.id not in before]
    return run.id


def run_pool(count: int, workers: int, out: str, delay: float) -> int:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(tick_body, i, out, delay) for i in range(count)]
        return sum(f.result() for f in futures)


def one_cycle(n: int, kill_at: float, delay: float, scratch: Path) -> dict[str, float]:
    effects = scratch / f"effects-{time.monotonic_ns()}.txt"
    run_id = run_and_kill(n, kill_at, delay, effects)
    recorded = sum(1 for s in keel.Client().run(run_id).steps if s.status == "SUCCEEDED")
    lines_before = effects.read_text().count("\n")
    remaining = n + 1 - recorded  # the reduce is a step too
    resume_s, handle = timed(lambda: keel.resume(run_id))
    expect(handle.result(), n * (n - 1) // 2, "the resumed run's result")
    ran = effects.read_text().count("\n") - lines_before
    baseline_out = str(scratch / "baseline.txt")
    pool_s, _ = timed(lambda: run_pool(remaining, pool_workers(), baseline_out, delay))
    return {
        "resume_s": resume_s,
        "pool_s": pool_s,
        "executed": lines_before,
        "recorded": recorded,
        "remaining": remaining,
        "ran": ran,
    }


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=10_000)
    p.add_argument("--kill-at", type=float, default=0.9, help="fraction done at the kill")
    p.add_argument("--delay", type=float, default=0.0, help="seconds each step sleeps")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--out", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:  # the subprocess that gets killed; it uses the parent's KEEL_HOME
        keel.run(resumable, n=args.n, out=args.out, delay=args.delay)
        return 0
    home = fresh_home(args.db_url, args.keep)
    scratch = Path(tempfile.mkdtemp(dir=home, prefix="effects-"))
    cycles = [one_cycle(args.n, args.kill_at, args.delay, scratch) for _ in range(args.repeat)]
    resume_s = statistics.median(c["resume_s"] for c in cycles)
    pool_s = statistics.median(c["pool_s"] for c in cycles)
    overhead = statistics.median(c["resume_s"] - c["pool_s"] for c in cycles)
    detail = "\n    ".join(
        f"{c['executed']:.0f} executed, {c['recorded']:.0f} recorded at the kill; "
        f"{c['remaining']:.0f} left, {c['ran']:.0f} ran on resume, in {c['resume_s']:.3f} s"
        for c in cycles
    )
    report(
        f"B3 resume: {args.n:,} steps + reduce, SIGKILL at ~{args.kill_at:.0%}, then "
        f"keel.resume (median of {args.repeat})",
        [
            ("cycles", "\n    " + detail),
            ("keel resume", f"{resume_s:.3f} s"),
            ("remaining work", f"{pool_s:.3f} s (ThreadPoolExecutor, same calls)"),
            ("resume overhead", f"{overhead:.3f} s"),
        ],
        [
            Result(
                "B3",
                "resume s",
                resume_s,
                pool_s,
                f"<= remaining work + {TARGET_OVERHEAD_S:.0f} s",
                overhead <= TARGET_OVERHEAD_S,
                unit="s",
                baseline_name="remaining work on ThreadPoolExecutor",
                extra={"n": args.n, "overhead_s": overhead, "cycles": cycles},
            )
        ],
        args.json,
    )
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
