"""What the worker, timer, signal and database-blip tests share: `keel worker`
processes, a workflow running on a thread of the test, polling with generous
timeouts, the side-effect files of tests/flows/worker_flows.py, and reads of the
queue and run tables. Nothing here asserts a wall-clock time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import keel

TESTS = Path(__file__).resolve().parent.parent
FLOW_FILE = TESTS / "flows" / "worker_flows.py"
WAIT_SECONDS = 180.0
POLL_SECONDS = 0.05


def child_env(**extra: str) -> dict[str, str]:
    """This test's store (KEEL_HOME / KEEL_DB_URL) and `flows.*` importable by name."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


_started: list[Proc] = []


@pytest.fixture(autouse=True)
def reap_processes() -> Iterator[None]:
    """Kill what a test started and left running (a failed test must not leave workers
    behind, serving the next test's queues). Test modules import this fixture."""
    yield
    while _started:
        proc = _started.pop()
        if not proc.ended():
            proc.proc.kill()
        proc.proc.wait(timeout=60)


class Proc:
    """A subprocess whose output goes to files (a pipe nobody reads could stall it)."""

    def __init__(self, logs: Path, label: str, args: list[str], env: dict[str, str]) -> None:
        self.label = label
        self.stdout = logs / f"{label}.stdout"
        self.stderr = logs / f"{label}.stderr"
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, cwd=TESTS.parent)
        _started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ended(self) -> bool:
        return self.proc.poll() is not None

    def output(self) -> str:
        out = self.stdout.read_text(errors="replace")
        err = self.stderr.read_text(errors="replace")[-6000:]
        return f"{self.label} (pid {self.pid}): exit code {self.proc.returncode}\n{out}\n{err}"

    def report(self) -> str:
        """Exit code and output, for failure messages (kills the process if still alive)."""
        if not self.ended():
            self.proc.kill()
        self.proc.wait(timeout=60)
        return self.output()

    def kill_hard(self) -> None:
        """SIGKILL, then reap the process (a zombie would still look alive)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        assert self.proc.returncode == -signal.SIGKILL, f"not killed: {self.report()}"

    def terminate(self, timeout: float = WAIT_SECONDS, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or `sig`) and wait for the exit; its exit code."""
        if not self.ended():
            os.kill(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{self.label} did not exit {timeout:.0f} s after SIGTERM:\n{self.report()}"
            )


class WorkerProcess(Proc):
    """`python -m keel worker ...` on this test's store."""

    def __init__(
        self,
        logs: Path,
        label: str,
        *queues: str,
        concurrency: int = 4,
        lease: float | None = None,
        grace: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        args = [sys.executable, "-m", "keel", "worker", "--no-scheduler"]
        for q in queues:
            args += ["--queue", q]
        args += ["--concurrency", str(concurrency)]
        if lease is not None:
            args += ["--lease", str(lease)]
        if grace is not None:
            args += ["--grace", str(grace)]
        super().__init__(logs, label, args, env or child_env())
        self._id: str | None = None

    @property
    def id(self) -> str:
        """The worker id it printed on start-up (waits for it)."""
        if self._id is None:
            wait_until(
                f"{self.label} to print its id",
                lambda: self.stdout.read_text().startswith("worker "),
                self,
            )
            self._id = self.stdout.read_text().split()[1]
        return self._id


def flow_process(logs: Path, workflow: str, **params: object) -> Proc:
    """`python tests/flows/worker_flows.py WORKFLOW k=v ...`: a run in a subprocess."""
    args = [sys.executable, str(FLOW_FILE), workflow, *(f"{k}={v}" for k, v in params.items())]
    return Proc(logs, workflow, args, child_env())


def wait_until(what: str, condition: Callable[[], bool], *procs: Proc | None) -> None:
    """Poll `condition` until it holds; fail with the processes' output if it never does
    or if one of them exits first."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        for p in procs:
            if p is not None and p.ended():
                pytest.fail(f"{p.label} exited while waiting for {what}:\n{p.output()}")
        if time.monotonic() > deadline:
            reports = "\n".join(p.report() for p in procs if p is not None)
            pytest.fail(f"gave up after {WAIT_SECONDS:.0f} s waiting for {what}\n{reports}")
        time.sleep(POLL_SECONDS)


class InThread:
    """`keel.run(workflow, **params)` on a thread of the test (its foreground follows a
    parked run, as a user's `keel.run` would)."""

    def __init__(self, workflow: Any, **params: Any) -> None:
        self.handle: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(workflow, params), daemon=True)
        self.thread.start()

    def _run(self, workflow: Any, params: dict[str, Any]) -> None:
        try:
            self.handle = keel.run(workflow, **params)
        except BaseException as exc:
            self.error = exc

    def ended(self) -> bool:
        return not self.thread.is_alive()

    def join(self, *procs: Proc | None) -> Any:
        wait_until("the run to end", self.ended, *procs)
        if self.error is not None:
            raise self.error
        return self.handle


# -- side-effect files -------------------------------------------------------------------
def read_lines(path: Path) -> list[str]:
    """The complete lines of a side-effect file (a line being written is left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


def step_runs(path: Path) -> Counter[int]:
    """How many times each step index ran (lines `i pid`)."""
    return Counter(int(line.split()[0]) for line in read_lines(path))


def pids_of(path: Path) -> set[int]:
    return {int(line.split()[1]) for line in read_lines(path)}


# -- the store ----------------------------------------------------------------------------
def store() -> Any:
    from keel.store.metadata import open_store

    return open_store()


def run_row(run_id: str) -> Any:
    row = store().get_run(run_id)
    assert row is not None, f"no run {run_id}"
    return row


def only_run_id(workflow: str) -> str:
    runs = keel.Client().runs(workflow=workflow)
    assert len(runs) == 1, f"expected one run of {workflow}, found {runs}"
    return runs[0].id


def runs_of(workflow: str) -> list[Any]:
    return keel.Client().runs(workflow=workflow)


def succeeded_seqs(run_id: str) -> set[int]:
    """Positions of the steps the store records as SUCCEEDED now (task steps only)."""
    return {s.seq for s in store().load_steps(run_id) if s.status == "SUCCEEDED"}


def steps_by_key(run_id: str) -> dict[str, Any]:
    return {s.key: s for s in store().load_steps(run_id)}


def queue_rows(**where: Any) -> list[Any]:
    from keel.store.schema import queue_items

    stmt = sa.select(queue_items).order_by(queue_items.c.id)
    for column, value in where.items():
        stmt = stmt.where(queue_items.c[column] == value)
    with store().engine.connect() as conn:
        return list(conn.execute(stmt))


def run_queue_row(run_id: str) -> Any:
    rows = queue_rows(dedupe=f"run:{run_id}")
    assert len(rows) == 1, f"run {run_id} has {len(rows)} queue entries"
    return rows[0]
