"""`keel worker` processes sharing the work queue, on SQLite and PostgreSQL.

Real worker processes (`python -m keel worker`), real SIGKILL and SIGTERM. Steps
append one line per execution (`index pid`) to a side-effect file, so a test counts
how often each step really ran and which process ran it. What must hold: no step is
lost; no step whose outcome the store had recorded as SUCCEEDED runs again; a
stopped worker hands its claims back at once; a dead one's are taken over after
its lease expires. Waits poll with generous timeouts; no wall-clock time is asserted.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import keel
from flows import worker_flows as flows
from flows.worker_support import (  # reap_processes: an autouse fixture
    InThread,
    Proc,
    WorkerProcess,
    child_env,
    pids_of,
    queue_rows,
    read_lines,
    reap_processes,  # noqa: F401
    run_queue_row,
    run_row,
    runs_of,
    step_runs,
    store,
    succeeded_seqs,
    wait_until,
)
from keel.scheduler.worker import Worker
from keel.store import queue

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def keel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    both = result.stdout + result.stderr
    assert result.returncode == code, both
    assert result.stderr.startswith("error: "), both
    assert "Traceback" not in both, both
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"


def check_ran_once_if_recorded(
    runs: Counter[int], n: int, recorded_at_kill: set[int], what: str
) -> None:
    """Every step ran; none recorded as SUCCEEDED at the kill ran again."""
    assert set(runs) == set(range(n)), f"steps never run: {sorted(set(range(n)) - set(runs))}"
    again = sorted(i for i in recorded_at_kill if runs[i] != 1)
    assert not again, f"steps recorded before {what} ran again: {again[:20]}"


# -- queued steps -------------------------------------------------------------------------
def test_two_workers_500_steps_one_killed_midway(backend: str, tmp_path: Path) -> None:
    n = 500
    out = tmp_path / "effects.txt"
    # A short lease, so the survivor takes over the dead worker's steps soon.
    w1 = WorkerProcess(tmp_path, "w1", flows.STEPS_QUEUE, lease=3)
    w2 = WorkerProcess(tmp_path, "w2", flows.STEPS_QUEUE, lease=3)
    assert w1.id != w2.id  # both are up, so neither finds the queue drained by the other
    running = InThread(flows.queued_fanout, out=str(out), n=n, delay=0.01)
    wait_until(
        "both workers to run steps and 150 steps to have run",
        lambda: len(read_lines(out)) >= 150 and {w1.pid, w2.pid} <= pids_of(out),
        w1,
        w2,
    )
    w1.kill_hard()
    run_id = runs_of("queued_fanout")[0].id
    recorded = succeeded_seqs(run_id)
    assert 0 < len(recorded) < n, f"{len(recorded)} steps recorded at the kill"

    handle = running.join(w2)
    assert handle.status == "SUCCEEDED", w2.report()
    assert handle.result() == sum(i * i for i in range(n))
    assert len(succeeded_seqs(run_id)) == n
    runs = step_runs(out)
    check_ran_once_if_recorded(runs, n, recorded, "the kill")
    assert pids_of(out) == {w1.pid, w2.pid}
    assert w2.terminate() == 0, w2.report()


def test_sigterm_hands_claimed_steps_back(backend: str, tmp_path: Path) -> None:
    n = 24
    out = tmp_path / "effects.txt"
    # A lease far longer than the test: only a hand-back lets another worker continue.
    first = WorkerProcess(tmp_path, "first", flows.STEPS_QUEUE, lease=600, grace=0)
    running = InThread(flows.queued_fanout, out=str(out), n=n, delay=1.0)
    wait_until("the first worker to run 6 steps", lambda: len(read_lines(out)) >= 6, first)
    assert first.terminate() == 0, first.report()
    assert "stopped after" in first.stdout.read_text()
    held = [r for r in queue_rows(status="claimed") if r.claimed_by == first.id]
    assert held == [], "a stopped worker keeps no claims"

    second = WorkerProcess(tmp_path, "second", flows.STEPS_QUEUE, lease=600)
    handle = running.join(second)
    assert handle.status == "SUCCEEDED"
    assert set(step_runs(out)) == set(range(n))
    assert second.pid in pids_of(out)
    assert second.terminate() == 0, second.report()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_sigterm_hands_a_claimed_run_back(backend: str, tmp_path: Path, sig: int) -> None:
    n = 40
    out = tmp_path / "effects.txt"
    handle = keel.submit(flows.slow_chain, out=str(out), n=n, delay=0.3)
    first = WorkerProcess(tmp_path, "first", "default", lease=600, grace=0)
    wait_until("the first worker to run 6 steps", lambda: len(read_lines(out)) >= 6, first)
    assert first.terminate(sig=sig) == 0, first.report()
    assert "stopped after" in first.stdout.read_text()
    recorded = succeeded_seqs(handle.id)
    item = run_queue_row(handle.id)
    assert (item.status, item.claimed_by) == ("queued", None), "the run was handed back"
    assert run_row(handle.id).status == "PENDING"

    second = WorkerProcess(tmp_path, "second", "default", lease=600)
    wait_until("the run to succeed", lambda: handle.status == "SUCCEEDED", second)
    assert handle.result() == sum(range(n))
    check_ran_once_if_recorded(step_runs(out), n, recorded, "the hand-back")
    assert second.pid in pids_of(out)
    assert second.terminate() == 0, second.report()


def test_a_killed_workers_run_is_resumed_by_another_after_its_lease(
    backend: str, tmp_path: Path
) -> None:
    n = 40
    out = tmp_path / "effects.txt"
    env = child_env(KEEL_LEASE_SECONDS="2")
    handle = keel.submit(flows.slow_chain, out=str(out), n=n, delay=0.2)
    first = WorkerProcess(tmp_path, "first", "default", env=env)
    wait_until("the first worker to run 8 steps", lambda: len(read_lines(out)) >= 8, first)
    first.kill_hard()
    recorded = succeeded_seqs(handle.id)
    assert recorded, "no step recorded before the kill"
    assert run_row(handle.id).status == "RUNNING"
    assert run_queue_row(handle.id).claimed_by == first.id

    second = WorkerProcess(tmp_path, "second", "default", env=env)
    wait_until("the run to succeed", lambda: handle.status == "SUCCEEDED", second)
    assert handle.result() == sum(range(n))
    check_ran_once_if_recorded(step_runs(out), n, recorded, "the kill")
    item = run_queue_row(handle.id)
    assert item.status == "done"
    assert item.claims >= 2, "claimed by the first worker, then by the second"
    assert run_row(handle.id).pid == second.pid
    assert second.terminate() == 0, second.report()


def test_each_collected_outcome_reaches_its_own_step(backend: str) -> None:
    """Outcomes collected in one batch, while their callbacks queue further steps, go to
    the step they belong to: the coordinator matches them by attempt, never by row id
    (a collected row's id may be given out again)."""
    import cloudpickle

    from keel.executors.base import StepCall, StepOutcome
    from keel.executors.queue import QueueExecutor
    from keel.store.config import StoreConfig

    config = StoreConfig.from_env()
    executor = QueueExecutor(8)
    delivered: dict[int, list[Any]] = {}
    all_in = threading.Event()

    def call(seq: int) -> StepCall:
        return StepCall(
            run_id="r-match", seq=seq, key=f"s-{seq}", task="s", fn=len, args=(), kwargs={},
            attempt=1, artifacts_url=config.artifacts_url, inline_limit=0,
            db_url=config.db_url,
        )  # fmt: skip

    def submit(seq: int) -> None:
        def done(outcome: StepOutcome) -> None:
            delivered.setdefault(seq, []).append(outcome.value)
            if seq < 3:  # queued while the rest of the batch waits for delivery
                submit(seq + 10)
                submit(seq + 20)
            if len(delivered) == 9:
                all_in.set()

        executor.submit(call(seq), done)

    def report(count: int) -> None:
        """Play the worker: claim `count` queued steps, report each seq as its value."""
        reported: list[int] = []

        def one() -> bool:
            claim = queue.claim(store(), "w", ["default"], lease_seconds=30)
            if claim is not None:
                outcome = StepOutcome(ok=True, started_at=0.0, ended_at=0.0, value=claim.seq)
                assert queue.complete(store(), claim.id, "w", cloudpickle.dumps(outcome))
                reported.append(claim.id)
            return len(reported) >= count

        wait_until(f"{count} queued steps", one)

    for seq in range(3):
        submit(seq)
    report(3)
    wait_until("the first three outcomes", lambda: len(delivered) >= 3)
    report(6)
    wait_until("all nine outcomes", all_in.is_set)
    executor.shutdown()
    assert delivered == {seq: [seq] for seq in (0, 1, 2, 10, 11, 12, 20, 21, 22)}


# -- claims ---------------------------------------------------------------------------------
CLAIMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from keel.store import queue
    from keel.store.metadata import open_store

    me, gate = sys.argv[1], Path(sys.argv[2])
    store = open_store()
    (gate / f"{me}.ready").touch()
    while not (gate / "go").exists():  # all claimers start together
        time.sleep(0.01)
    idle_since = None
    while True:
        claim = queue.claim(store, me, ["bulk"], lease_seconds=600)
        if claim is None:
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 3:
                break
            continue
        idle_since = None
        print(claim.id, flush=True)
        time.sleep(0.002)  # the work, done outside any transaction as a worker does
        queue.complete(store, claim.id, me, b"ok")
    """
)


def test_concurrent_claimers_take_each_item_exactly_once(backend: str, tmp_path: Path) -> None:
    n = 300
    db = store()
    items = [queue.StepItem("r-bulk", i, 1, "bulk", 0, None, b"call") for i in range(n)]
    queue.enqueue_steps(db, items)
    gate = tmp_path / "gate"
    gate.mkdir()
    claimers = [
        Proc(tmp_path, f"c{k}", [sys.executable, "-c", CLAIMER, f"c{k}", str(gate)], child_env())
        for k in range(3)
    ]
    ready = [gate / f"{c.label}.ready" for c in claimers]
    wait_until("every claimer to open the store", lambda: all(map(Path.exists, ready)), *claimers)
    (gate / "go").touch()
    for c in claimers:
        wait_until(f"{c.label} to finish", c.ended)
        assert c.proc.returncode == 0, c.output()
    claimed = {c.label: [int(x) for x in c.stdout.read_text().split()] for c in claimers}
    counts = Counter(i for ids in claimed.values() for i in ids)
    assert len(counts) == n, f"{n - len(counts)} items never claimed"
    assert max(counts.values()) == 1, [i for i, k in counts.items() if k > 1]
    # Started together, with work between claims, none of them can be shut out.
    assert all(claimed.values()), {label: len(ids) for label, ids in claimed.items()}
    rows = queue_rows(run_id="r-bulk")
    assert {r.status for r in rows} == {"done"}
    assert {r.claims for r in rows} == {1}


def test_claims_take_the_most_urgent_then_oldest_across_queues_and_expired_leases(
    backend: str,
) -> None:
    db = store()
    layout = [("a", 0), ("b", 5), ("a", 5), ("b", 0), ("a", 9), ("other", 99)]
    queue.enqueue_steps(
        db,
        [queue.StepItem("r-order", seq, 1, q, p, None, b"x") for seq, (q, p) in enumerate(layout)],
    )
    lost = queue.claim(db, "dead", ["a"], lease_seconds=0.01)  # seq 4 (priority 9)
    assert lost is not None and lost.seq == 4
    time.sleep(0.05)  # its lease runs out: claimable again, still the most urgent
    taken = []
    while (claim := queue.claim(db, "w", ["a", "b"], lease_seconds=60)) is not None:
        taken.append((claim.seq, claim.claims))
    assert taken == [(4, 2), (1, 1), (2, 1), (0, 1), (3, 1)]  # queue "other" is not served


def test_a_claim_reads_the_backlog_in_index_order(backend: str) -> None:
    """Claims must not sort the whole backlog (that made each claim cost O(backlog)):
    every query a claim runs is planned without a sort over the queue."""
    import sqlalchemy as sa

    db = store()
    items = [queue.StepItem("r-plan", i, 1, "bulk", i % 3, None, b"x") for i in range(2000)]
    queue.enqueue_steps(db, items)
    if db.dialect == "postgresql":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE keel_queue")
    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if sql.lstrip().upper().startswith("SELECT") and "keel_queue" in sql:
            statements.append((sql, params))

    sa.event.listen(db.engine, "before_cursor_execute", seen)
    try:
        claim = queue.claim(db, "w", ["bulk"], lease_seconds=60)
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", seen)
    assert claim is not None and (claim.seq, claim.attempt) == (2, 1)  # priority 2, oldest
    assert len(statements) >= 2
    explain = "EXPLAIN " if db.dialect == "postgresql" else "EXPLAIN QUERY PLAN "
    picked_in_order = 0
    with db.engine.connect() as conn:
        for sql, params in statements:
            plan = " ".join(str(row) for row in conn.exec_driver_sql(explain + sql, params))
            picked_in_order += "ix_keel_queue_pick" in plan
            assert "Seq Scan on keel_queue" not in plan, (sql, plan)  # PostgreSQL
            assert "SCAN keel_queue" not in plan.replace("SCAN keel_queue USING", ""), plan
            # (Items whose lease ran out are few; sorting them is fine.)
            if "ORDER BY" in sql and "lease_until <" not in sql:  # queued, in claim order
                assert "ix_keel_queue_pick" in plan, plan
                assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan
    assert picked_in_order, "no claim query read the queue through ix_keel_queue_pick"


def test_three_workers_run_300_steps_each_exactly_once(backend: str, tmp_path: Path) -> None:
    n = 300
    out = tmp_path / "effects.txt"
    workers = [WorkerProcess(tmp_path, f"w{k}", flows.STEPS_QUEUE) for k in range(3)]
    handle = InThread(flows.queued_fanout, out=str(out), n=n).join(*workers)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == sum(i * i for i in range(n))
    runs = step_runs(out)
    assert set(runs) == set(range(n))
    assert max(runs.values()) == 1, [i for i, k in runs.items() if k > 1]
    for w in workers:
        assert w.terminate() == 0, w.report()


# -- pools and priorities ---------------------------------------------------------------------
def test_a_pool_caps_concurrent_steps_across_workers(backend: str, tmp_path: Path) -> None:
    result = keel_cli("pools", "set", "gpu", "2")
    assert result.returncode == 0, result.stderr
    counter = tmp_path / "counter.txt"
    workers = [WorkerProcess(tmp_path, f"w{k}", flows.GPU_QUEUE, concurrency=4) for k in range(2)]
    handle = InThread(flows.gpu_fanout, counter=str(counter), n=8, hold=0.8).join(*workers)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == 8
    now, peak = flows.read_peak(str(counter))
    assert now == 0
    assert peak == 2, f"at most {peak} steps of pool gpu ran at once; the cap is 2"
    listed = keel_cli("pools", "ls")
    assert listed.returncode == 0
    assert listed.stdout.split("\n")[1].split() == ["gpu", "2", "0"]
    for w in workers:
        assert w.terminate() == 0, w.report()


def test_an_unknown_pool_is_a_clear_error(backend: str) -> None:
    handle = keel.run(flows.unknown_pool)
    assert handle.status == "FAILED"
    step = keel.Client().run(handle.id).step("nopool_step-0")
    assert step.status == "FAILED"
    assert "unknown pool 'no-such-pool'" in (step.error_message or "")
    cli = keel_cli("run", "flows.worker_flows:unknown_pool")
    assert cli.returncode == 1
    assert "unknown pool 'no-such-pool'" in cli.stdout + cli.stderr
    # Read from the closing "see:" line: a slow start may print a progress line first.
    (run_id,) = re.findall(r"see: keel runs show (\S+)", cli.stdout + cli.stderr)
    shown = keel_cli("runs", "show", run_id)
    assert "Create it with `keel pools set no-such-pool SLOTS`" in shown.stdout


def test_priorities_order_the_steps_of_a_queue(backend: str, tmp_path: Path) -> None:
    n = 10
    out = tmp_path / "effects.txt"
    running = InThread(flows.priorities, out=str(out), n=n)
    wait_until(
        "all the steps to be queued",
        lambda: len(queue_rows(queue=flows.PRIO_QUEUE, status="queued")) == 2 * n,
    )
    # One worker taking one item at a time runs them in priority order.
    worker = Worker(queues=[flows.PRIO_QUEUE], concurrency=1, poll_seconds=0.05)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert running.join().status == "SUCCEEDED"
    finally:
        worker.stop()
        thread.join(60)
    lines = read_lines(out)
    assert [line.split("-")[0] for line in lines] == ["high"] * n + ["low"] * n, lines


# -- the command line -----------------------------------------------------------------------
def test_keel_run_submit_then_a_worker_runs_it(backend: str, tmp_path: Path) -> None:
    submitted = keel_cli("run", "flows.worker_flows:hello_queue", "--submit", "-p", "name=bob")
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.split()[2]
    assert f"queued run {run_id} of hello_queue on queue 'submitted'" in submitted.stdout
    assert f"keel runs show {run_id}" in submitted.stdout
    assert "warning: no live worker serves queue 'submitted'" in submitted.stderr
    assert run_row(run_id).status == "PENDING"

    worker = WorkerProcess(tmp_path, "worker", "submitted", "other")
    wait_until("the run to succeed", lambda: run_row(run_id).status == "SUCCEEDED", worker)
    assert keel.Client().run(run_id).result() == "hello bob"

    listed = keel_cli("workers", "ls")
    assert listed.returncode == 0, listed.stderr
    assert worker.id in listed.stdout
    assert "submitted, other" in listed.stdout

    # A live worker serves the queue now: no warning; the priority is kept.
    again = keel_cli(
        "run", "flows.worker_flows:hello_queue", "--submit", "--queue", "other", "--priority", "7"
    )
    assert again.returncode == 0, again.stderr
    assert "warning" not in again.stderr
    second = again.stdout.split()[2]
    wait_until("the second run to succeed", lambda: run_row(second).status == "SUCCEEDED", worker)
    item = run_queue_row(second)
    assert (item.queue, item.priority) == ("other", 7)

    assert worker.terminate() == 0, worker.report()
    assert worker.id not in keel_cli("workers", "ls").stdout
    assert worker.id in keel_cli("workers", "ls", "--all").stdout


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """A command in this process (no start-up cost), for bad input and reads."""
    from typer.testing import CliRunner

    from keel.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(
        ["keel", *args], result.exit_code, result.stdout, result.stderr
    )


def test_worker_cli_bad_input(backend: str) -> None:
    wf = "flows.worker_flows:hello_queue"
    assert_clean_error(cli("worker", "--queue", "no spaces"), 2, "bad queue name 'no spaces'")
    assert_clean_error(cli("worker", "--load", "no/such/file.py"), 2, "no such file")
    assert_clean_error(cli("worker", "--load", "no_such_module_x"), 2, "cannot import")
    assert_clean_error(cli("run", wf, "--queue", "x"), 2, "apply to queued runs", "--submit")
    assert_clean_error(cli("run", wf, "--submit", "--max-concurrency", "2"), 2, "not to --submit")
    assert_clean_error(cli("run", wf, "--submit", "--queue", "a b"), 2, "bad queue name 'a b'")
    assert_clean_error(cli("pools", "set", "a b", "2"), 2, "bad pool name 'a b'")
    assert cli("pools", "set", "gpu", "-1").returncode == 2
    assert runs_of("hello_queue") == [], "nothing was queued by bad input"


def test_pools_and_workers_listings(backend: str) -> None:
    empty = cli("pools", "ls")
    assert (empty.returncode, empty.stdout.strip()) == (
        0,
        "no pools; create one with `keel pools set NAME SLOTS`",
    )
    nobody = cli("workers", "ls")
    assert (nobody.returncode, nobody.stdout.strip()) == (
        0,
        "no live workers; start one with `keel worker --queue QUEUE`",
    )
    assert cli("pools", "set", "gpu", "1").stdout.strip() == "pool gpu created 1 slot"
    assert cli("pools", "set", "gpu", "3").stdout.strip() == "pool gpu changed from 1 to 3 slots"
    assert cli("pools", "set", "cpu", "8").returncode == 0
    listed = cli("pools", "ls").stdout.strip().splitlines()
    assert [line.split() for line in listed] == [
        ["POOL", "SLOTS", "RUNNING"],
        ["cpu", "8", "0"],
        ["gpu", "3", "0"],
    ]
