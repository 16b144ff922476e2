"""B5 start-up: wall time of `python -c "import keel"` and of `keel --help`, each in
a fresh subprocess (median of several runs after a warm-up).

Baseline, in the same run: `python -c "pass"` (the interpreter's own start-up).
Targets: `import keel` <= 0.3 s and `keel --help` <= 0.5 s, start-up included.

    python bench/b5_startup.py [--repeat 7] [--explain]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import Result, fresh_home, parser, report

TARGET_IMPORT_S = 0.3
TARGET_HELP_S = 0.5


def keel_command() -> list[str]:
    """The `keel` console script installed next to this interpreter (else `-m keel`)."""
    script = Path(sys.executable).parent / "keel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "keel"]


def wall_time(cmd: list[str], repeat: int) -> tuple[float, list[float]]:
    """Median seconds of `repeat` runs of `cmd` (after one warm-up run); all the times."""
    env = dict(os.environ)
    subprocess.run(cmd, env=env, capture_output=True, check=False)
    times = []
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(
                f"{' '.join(cmd)} failed with exit code {done.returncode}:\n{done.stderr[-2000:]}"
            )
    return statistics.median(times), times


def slowest_imports(cmd: list[str], top: int = 12) -> list[str]:
    """The modules with the largest cumulative import time (python -X importtime)."""
    if cmd[0] != sys.executable:
        cmd = [sys.executable, *cmd]  # the console script is a Python file
    done = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, check=False
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self_us, cumulative_us, name = line.split(":", 1)[1].split("|", 2)
        rows.append((int(cumulative_us), name.rstrip()))
    rows.sort(reverse=True)
    return [f"{us / 1000:8.1f} ms  {name}" for us, name in rows[:top]]


def main(argv: list[str]) -> int:
    p = parser(__doc__.splitlines()[0], n=0, repeat=7)
    p.add_argument(
        "--explain", action="store_true", help="list the slowest imports of each command"
    )
    args = p.parse_args(argv)
    fresh_home(args.db_url, args.keep)
    python = sys.executable
    base_s, base_all = wall_time([python, "-c", "pass"], args.repeat)
    import_cmd = [python, "-c", "import keel"]
    import_s, import_all = wall_time(import_cmd, args.repeat)
    help_cmd = [*keel_command(), "--help"]
    help_s, help_all = wall_time(help_cmd, args.repeat)

    def spread(times: list[float]) -> str:
        return f"min {min(times):.3f} s, max {max(times):.3f} s"

    lines = [
        ('python -c "pass"', f"{base_s:.3f} s ({spread(base_all)})"),
        (
            'python -c "import keel"',
            f"{import_s:.3f} s ({spread(import_all)}); "
            f"{import_s - base_s:.3f} s over the bare interpreter",
        ),
        (
            " ".join(Path(c).name for c in help_cmd),
            f"{help_s:.3f} s ({spread(help_all)}); "
            f"{help_s - base_s:.3f} s over the bare interpreter",
        ),
    ]
    if args.explain:
        for label, cmd in (("import keel", import_cmd), ("keel --help", help_cmd)):
            lines.append((f"slowest imports, {label}", "cumulative"))
            lines.extend(("", row) for row in slowest_imports(cmd))
    report(
        f"B5 start-up: median of {args.repeat} runs in fresh subprocesses",
        lines,
        [
            Result(
                "B5",
                "import keel s",
                import_s,
                base_s,
                f"<= {TARGET_IMPORT_S} s",
                import_s <= TARGET_IMPORT_S,
                unit="s",
                baseline_name='python -c "pass"',
            ),
            Result(
                "B5",
                "keel --help s",
                help_s,
                base_s,
                f"<= {TARGET_HELP_S} s",
                help_s <= TARGET_HELP_S,
                unit="s",
                baseline_name='python -c "pass"',
            ),
        ],
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
