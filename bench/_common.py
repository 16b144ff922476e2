"""What every benchmark shares: a fresh store, command-line options, timing, and the
printed report (the keel figure, the baseline measured in the same run, the ratio,
and the target with PASS/MISS).

Each `bench/bNN_*.py` is a script: `python bench/b1_fanout.py --help`. With `--json
PATH` it also appends its results as JSON lines (`bench/run_all.py` uses that).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


def fresh_home(db_url: str | None = None, keep: bool = False) -> Path:
    """Point keel at a new temporary KEEL_HOME (never ~/.keel); removed at exit unless kept.

    Must run before keel opens its store. The embedded SQLite store is used unless
    `db_url` names another database.
    """
    home = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    os.environ["KEEL_HOME"] = str(home)
    for name in ("KEEL_DB_URL", "KEEL_ARTIFACTS", "KEEL_EXECUTOR"):
        os.environ.pop(name, None)
    if db_url:
        os.environ["KEEL_DB_URL"] = db_url
    if not keep:
        atexit.register(shutil.rmtree, home, True)
    return home


def parser(description: str, n: int, repeat: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", type=int, default=n, help=f"number of steps (default {n:,})")
    p.add_argument(
        "--repeat", type=int, default=repeat, help=f"measured runs, median kept (default {repeat})"
    )
    p.add_argument(
        "--db-url", default=None, help="another metadata store (default: embedded SQLite)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary KEEL_HOME")
    p.add_argument("--json", default=None, help="append the results to this file as JSON lines")
    return p


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall-clock seconds of one call, and its value."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_time(fn: Callable[[], Any], repeat: int, check: Callable[[Any], None]) -> float:
    """The median wall time of `repeat` calls; `check` validates each call's value."""
    times = []
    for _ in range(max(1, repeat)):
        seconds, value = timed(fn)
        check(value)
        times.append(seconds)
    return statistics.median(times)


def expect(value: Any, wanted: Any, what: str) -> None:
    if value != wanted:
        raise SystemExit(f"wrong result for {what}: got {value!r}, expected {wanted!r}")


@dataclass
class Result:
    """One benchmark figure against its baseline and target."""

    bench: str
    metric: str
    keel: float
    baseline: float | None
    target: str
    passed: bool | None
    unit: str = ""
    baseline_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.keel / self.baseline

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


def report(
    title: str, lines: list[tuple[str, str]], results: list[Result], json_path: str | None
) -> None:
    """Print the measured figures and the verdicts; append them to `json_path` if given."""
    print(f"\n{title}")
    width = max((len(k) for k, _ in lines), default=0)
    for key, text in lines:
        print(f"  {key:<{width}} : {text}")
    for r in results:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(
            f"  [{r.verdict}] {r.metric}: keel {fmt(r.keel, r.unit)}"
            f" | {r.baseline_name or 'baseline'} {fmt(r.baseline, r.unit)}"
            f" | ratio {ratio} | target {r.target}"
        )
    if json_path:
        with open(json_path, "a", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps(asdict(r) | {"ratio": r.ratio, "verdict": r.verdict}) + "\n")


def pool_workers() -> int:
    """The thread count keel's default executor uses, so the baseline gets the same."""
    from keel.executors import default_concurrency

    return default_concurrency()
