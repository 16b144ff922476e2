"""Schedules and backfills on SQLite and PostgreSQL.

The scheduler's clock is injected, so a test moves time (an outage is a jump of the
clock) instead of sleeping; workers run in threads of the test (or in a `keel worker`
process for the end-to-end check). No wall-clock time is asserted anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import keel
from flows import schedule_flows as flows
from keel.errors import DefinitionError, ParameterError, ScheduleError
from keel.scheduler.backfill import PRIORITY_DROP
from keel.scheduler.cadence import Cadence
from keel.scheduler.scheduler import Scheduler
from keel.scheduler.worker import Worker
from keel.store import queue
from keel.store.config import StoreConfig
from keel.store.metadata import MetadataStore, open_store
from keel.store.schema import pools, queue_items, runs, ticks

pytestmark = pytest.mark.timeout(300)

TESTS = Path(__file__).resolve().parent
T0 = datetime(2024, 6, 3, 0, 0, tzinfo=UTC)  # a Monday, on every interval boundary
WAIT = 120.0


class Clock:
    """The scheduler's clock, moved by the test."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def set(self, at: datetime) -> None:
        self.at = at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


def scheduler(clock: Clock, store: MetadataStore | None = None) -> Scheduler:
    return Scheduler(store, now=clock, trigger_interval=0, sync_declared=False)


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def runs_of(schedule: str) -> list[Any]:
    with open_store().engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(runs).where(runs.c.schedule == schedule).order_by(runs.c.logical_date)
            )
        )


def tick_rows(schedule: str) -> list[Any]:
    with open_store().engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(ticks).where(ticks.c.schedule == schedule).order_by(ticks.c.logical_date)
            )
        )


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class WorkerThread:
    """A `Worker` on a thread of the test, stopped (and joined) at the end."""

    def __init__(self, **options: Any) -> None:
        self.worker = Worker(poll_seconds=0.05, grace_seconds=5, **options)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        return self.worker

    def __exit__(self, *_: object) -> None:
        self.worker.stop()
        self.thread.join(60)


def finished(run_ids: list[str]) -> bool:
    store = open_store()
    return all(store.get_run(r).status in ("SUCCEEDED", "FAILED") for r in run_ids)


# -- ticks: cron in a time zone, intervals --------------------------------------------------
def instants(cadence: Cadence, start: datetime, end: datetime) -> list[str]:
    return [utc(t).isoformat() for t in cadence.between(start.timestamp(), end.timestamp())]


def test_cron_in_paris_across_both_dst_changes() -> None:
    """02:30 every day in Europe/Paris. Spring forward (30 March 2025: 02:00 -> 03:00)
    has no 02:30: it runs as if the clock had not jumped yet, at 01:30 UTC (03:30
    CEST). Fall back (26 October 2025: 03:00 -> 02:00) has two: it runs once, at the
    first (00:30 UTC, 02:30 CEST)."""
    daily = Cadence.parse(cron="30 2 * * *", every=None, timezone="Europe/Paris")
    assert instants(daily, datetime(2025, 3, 28, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC)) == [
        "2025-03-28T01:30:00+00:00",  # CET, +01:00
        "2025-03-29T01:30:00+00:00",
        "2025-03-30T01:30:00+00:00",  # the missing 02:30, as 03:30 CEST
        "2025-03-31T00:30:00+00:00",  # CEST, +02:00
    ]
    assert instants(
        daily, datetime(2025, 10, 24, tzinfo=UTC), datetime(2025, 10, 28, tzinfo=UTC)
    ) == [
        "2025-10-24T00:30:00+00:00",
        "2025-10-25T00:30:00+00:00",
        "2025-10-26T00:30:00+00:00",  # the first 02:30 only
        "2025-10-27T01:30:00+00:00",  # CET again
    ]
    assert daily.local_iso(datetime(2025, 3, 30, 1, 30, tzinfo=UTC).timestamp()) == (
        "2025-03-30T03:30:00+02:00"
    )
    hourly = Cadence.parse(cron="30 * * * *", every=None, timezone="Europe/Paris")
    # Spring: every real hour still has one run; autumn: the repeated 02:30 runs once.
    assert instants(
        hourly, datetime(2025, 3, 29, 23, tzinfo=UTC), datetime(2025, 3, 30, 3, tzinfo=UTC)
    ) == [
        "2025-03-29T23:30:00+00:00",  # 00:30 CET
        "2025-03-30T00:30:00+00:00",  # 01:30 CET
        "2025-03-30T01:30:00+00:00",  # 02:30 does not exist: as 03:30 CEST
        "2025-03-30T02:30:00+00:00",  # 04:30 CEST
    ]
    assert instants(
        hourly, datetime(2025, 10, 25, 23, tzinfo=UTC), datetime(2025, 10, 26, 3, tzinfo=UTC)
    ) == [
        "2025-10-25T23:30:00+00:00",  # 01:30 CEST
        "2025-10-26T00:30:00+00:00",  # 02:30 CEST
        "2025-10-26T02:30:00+00:00",  # 03:30 CET (02:30 CET is the repeat, skipped)
    ]
    at = datetime(2025, 10, 26, 1, 40, tzinfo=UTC).timestamp()
    assert utc(hourly.last_at_or_before(at)).isoformat() == "2025-10-26T00:30:00+00:00"
    assert utc(hourly.next_after(at)).isoformat() == "2025-10-26T02:30:00+00:00"


def test_intervals_are_multiples_of_the_interval_since_the_epoch() -> None:
    every = Cadence.parse(cron=None, every="15m", timezone="Asia/Kolkata")
    start = datetime(2024, 6, 3, 10, 7, tzinfo=UTC)
    assert instants(every, start, start + timedelta(minutes=40)) == [
        "2024-06-03T10:15:00+00:00",
        "2024-06-03T10:30:00+00:00",
        "2024-06-03T10:45:00+00:00",
    ]
    # The time zone only changes how the logical date is written.
    assert every.local_iso(datetime(2024, 6, 3, 10, 15, tzinfo=UTC).timestamp()) == (
        "2024-06-03T15:45:00+05:30"
    )
    assert Cadence.parse(cron=None, every="1h30m").every == 5400
    assert Cadence.parse(cron=None, every=timedelta(days=1)).every == 86400


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("61 * * * *", "bad cron expression '61 * * * *'"),
        ("0 3 * *", "has 4 fields, keel reads exactly 5"),
        ("0 3 * * * *", "has 6 fields"),
        ("every day", "bad cron expression 'every day'"),
        ("*/0 * * * *", "bad cron expression '*/0 * * * *'"),
        ("@sometimes", "unknown alias"),
        ("", "it is empty"),
        ("0 0 30 2 *", "cron expression '0 0 30 2 *' never fires"),
    ],
)
def test_bad_cron_strings_name_the_expression(cron: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message.replace("*", r"\*")) as caught:
        Cadence.parse(cron=cron, every=None)
    assert caught.value.hint


def test_unknown_time_zones_and_bad_intervals() -> None:
    with pytest.raises(ScheduleError, match="unknown time zone 'Europe/Pariss'") as caught:
        Cadence.parse(cron="0 3 * * *", every=None, timezone="Europe/Pariss")
    assert "Europe/Paris" in (caught.value.hint or "")
    for zone in ("Mars/Olympus", "../../etc/passwd", ""):
        with pytest.raises(ScheduleError, match="unknown time zone"):
            Cadence.parse(cron="0 3 * * *", every=None, timezone=zone)
    for every in ("0.5s", "0s", "fortnight", "-5m", "1m 30"):
        with pytest.raises(ScheduleError, match="interval"):
            Cadence.parse(cron=None, every=every)
    with pytest.raises(ScheduleError, match="exactly one of cron and every"):
        Cadence.parse(cron="0 3 * * *", every="1h")
    with pytest.raises(ScheduleError, match="exactly one of cron and every"):
        Cadence.parse(cron=None, every=None)


# -- definitions -------------------------------------------------------------------------
def test_add_list_pause_resume_remove(backend: str) -> None:
    info = keel.schedules.add(
        "nightly", flows.echo, cron="0 3 * * *", timezone="Europe/Paris", params={"label": "n"}
    )
    assert info.workflow == "sched_echo"
    assert info.entrypoint == "flows.schedule_flows:echo"
    assert (info.catchup, info.overlap, info.max_active_runs) == ("latest", "queue", None)
    assert info.next_run is not None and info.next_run.strftime("%H:%M") == "03:00"
    assert info.status == "active"
    assert [s.name for s in keel.schedules.ls()] == ["nightly"]
    assert keel.schedules.pause("nightly").status == "paused"
    assert keel.schedules.resume("nightly").status == "active"
    with pytest.raises(ScheduleError, match="exists already"):
        keel.schedules.add("nightly", flows.echo, every="1h")
    replaced = keel.schedules.add("nightly", flows.echo, every="1h", replace=True)
    assert replaced.cadence.describe() == "every 1h"
    keel.schedules.remove("nightly")
    assert keel.schedules.ls() == []


def test_bad_schedule_definitions_are_clear_errors(backend: str) -> None:
    with pytest.raises(DefinitionError, match="no such file"):
        keel.schedules.add("s", "nowhere/flows.py:wf", every="1h")
    with pytest.raises(DefinitionError, match=r"'missing' in flows\.schedule_flows does not exist"):
        keel.schedules.add("s", "flows.schedule_flows:missing", every="1h")
    with pytest.raises(ScheduleError, match=r"end .* is before its start"):
        keel.schedules.add("s", flows.echo, every="1h", start="2024-02-01", end="2024-01-01")
    with pytest.raises(ScheduleError, match="unknown catch-up policy 'some'"):
        keel.schedules.add("s", flows.echo, every="1h", catchup="some")
    with pytest.raises(ScheduleError, match="unknown overlap policy 'wait'"):
        keel.schedules.add("s", flows.echo, every="1h", overlap="wait")
    with pytest.raises(ScheduleError, match="max_active_runs must be"):
        keel.schedules.add("s", flows.echo, every="1h", max_active_runs=0)
    with pytest.raises(ScheduleError, match="bad schedule name"):
        keel.schedules.add("no spaces", flows.echo, every="1h")
    with pytest.raises(ScheduleError, match="not an ISO 8601"):
        keel.schedules.add("s", flows.echo, every="1h", start="yesterday")
    with pytest.raises(ParameterError, match="has no parameter 'nope'"):
        keel.schedules.add("s", flows.echo, every="1h", params={"nope": 1})
    with pytest.raises(ParameterError, match="parameter 'n' of workflow sched_plain expects int"):
        keel.schedules.add("s", flows.plain, every="1h", params={"n": "many"})
    with pytest.raises(ParameterError, match="'logical_date' is set by the schedule"):
        keel.schedules.add("s", flows.echo, every="1h", params={"logical_date": "2024-01-01"})
    keel.schedules.add("real", flows.echo, every="1h")
    for call in (keel.schedules.get, keel.schedules.pause, keel.schedules.remove):
        with pytest.raises(ScheduleError, match="no schedule named 'rael'") as caught:
            call("rael")
        assert caught.value.hint == "Did you mean real?"
    assert [s.name for s in keel.schedules.ls()] == ["real"]


def test_schedules_declared_in_code_are_registered(backend: str) -> None:
    declared = keel.schedules.sync(str(TESTS / "flows" / "declared_flows.py"))
    assert [s.name for s in declared] == ["declared_nightly", "every-quarter"]
    nightly = keel.schedules.get("declared_nightly")
    assert nightly.cadence == Cadence(cron="30 2 * * *", every=None, timezone="Europe/Paris")
    assert nightly.params == {"n": 3}
    quarter = keel.schedules.get("every-quarter")
    assert (quarter.cadence.every, quarter.catchup, quarter.overlap) == (900, "none", "skip")
    # Syncing again (another worker starting with the same code) changes nothing.
    keel.schedules.pause("every-quarter")
    again = {s.name: s for s in keel.schedules.sync(str(TESTS / "flows" / "declared_flows.py"))}
    assert again["every-quarter"].next_tick == quarter.next_tick
    assert again["every-quarter"].paused
    # A scheduler registers what the code loaded in its process declares.
    keel.schedules.remove("declared_nightly")
    Scheduler().tick()
    assert keel.schedules.get("declared_nightly").workflow == "declared_nightly"


# -- starting ticks --------------------------------------------------------------------------
def test_a_tick_queues_a_run_that_a_worker_runs_with_its_logical_date(backend: str) -> None:
    keel.schedules.add("echo", flows.echo, every="15m", start=T0, params={"label": "e2e"})
    keel.schedules.add(
        "texts", flows.str_date, cron="0 * * * *", timezone="America/New_York", start=T0
    )
    keel.schedules.add("plain", flows.plain, every="1h", start=T0, queue="nightly", priority=3)
    clock = Clock(T0 + timedelta(seconds=20))
    started = scheduler(clock).tick().started
    assert len(started) == 3
    echo, text, plain = runs_of("echo")[0], runs_of("texts")[0], runs_of("plain")[0]
    for run in (echo, text, plain):
        assert run.status == "PENDING" and run.logical_date == T0.timestamp()
        assert run.trigger_name is None
    assert (plain.queue, plain.priority, echo.queue, echo.priority) == ("nightly", 3, "default", 0)
    with WorkerThread(queues=["default", "nightly"]):
        wait_until("the runs to end", lambda: finished([echo.id, text.id, plain.id]))
    assert keel.Client().run(echo.id).result() == "e2e@2024-06-03T00:00:00+00:00"
    assert keel.Client().run(text.id).result() == "2024-06-02T20:00:00-04:00"
    assert keel.Client().run(plain.id).result() == 1
    assert keel.Client().run(echo.id).params["label"] == "e2e"
    assert [(r.logical_date, r.run_id) for r in tick_rows("echo")] == [(T0.timestamp(), echo.id)]
    # The next pass finds nothing due until the clock reaches the next tick.
    assert scheduler(clock).tick().started == []
    clock.advance(minutes=15)
    assert len(scheduler(clock).tick().started) == 1


@pytest.mark.parametrize(("catchup", "after_outage"), [("none", 0), ("latest", 1), ("all", 8)])
def test_catch_up_after_an_outage(backend: str, catchup: str, after_outage: int) -> None:
    keel.schedules.add("cu", flows.echo, every="15m", catchup=catchup, start=T0)
    clock = Clock(T0 + timedelta(seconds=5))
    sched = scheduler(clock)
    assert len(sched.tick().started) == 1  # on time: T0
    # Nothing runs from just after T0 until 02:07: the ticks 00:15 .. 02:00 are missed.
    clock.set(T0 + timedelta(hours=2, minutes=7))
    result = sched.tick()
    assert len(result.started) == after_outage
    assert result.missed == 8 - after_outage
    expected = {
        "none": [T0],
        "latest": [T0, T0 + timedelta(hours=2)],
        "all": [T0 + timedelta(minutes=15 * k) for k in range(9)],
    }[catchup]
    assert [utc(r.logical_date) for r in runs_of("cu")] == expected
    # Back to normal: the next tick is on time under every policy.
    clock.set(T0 + timedelta(hours=2, minutes=15, seconds=3))
    assert len(sched.tick().started) == 1
    assert sched.tick().started == []
    assert len(runs_of("cu")) == len(expected) + 1
    assert len(tick_rows("cu")) == len(expected) + 1


def test_catch_up_none_still_runs_a_tick_seen_in_time(backend: str) -> None:
    keel.schedules.add("cn", flows.plain, every="15m", catchup="none", start=T0)
    clock = Clock(T0 + timedelta(hours=2, seconds=30))  # 00:00 .. 01:45 missed, 02:00 is now
    assert len(scheduler(clock).tick().started) == 1
    assert [utc(r.logical_date) for r in runs_of("cn")] == [T0 + timedelta(hours=2)]


def test_a_cron_schedule_across_daylight_saving_changes(backend: str) -> None:
    keel.schedules.add(
        "paris",
        flows.echo,
        cron="30 2 * * *",
        timezone="Europe/Paris",
        catchup="all",
        start="2025-03-28",
        end="2025-03-31T23:00",
    )
    clock = Clock(datetime(2025, 4, 2, tzinfo=UTC))
    assert len(scheduler(clock).tick().started) == 4
    found = runs_of("paris")
    assert [utc(r.logical_date).isoformat() for r in found] == [
        "2025-03-28T01:30:00+00:00",
        "2025-03-29T01:30:00+00:00",
        "2025-03-30T01:30:00+00:00",
        "2025-03-31T00:30:00+00:00",
    ]
    assert keel.Client().run(found[2].id).params["logical_date"] == "2025-03-30T03:30:00+02:00"
    # The schedule has ended: no tick after its end.
    assert keel.schedules.get("paris").status == "ended"


def _race(
    stores: list[MetadataStore], clock: Clock, rounds: int, step: Callable[[int], float]
) -> list[Any]:
    """Schedulers on threads, one per store, all passing at once after every clock move."""
    moves = iter(range(rounds + 1))
    barrier = threading.Barrier(
        len(stores), action=lambda: clock.advance(seconds=step(next(moves)))
    )
    outcomes: list[Any] = []

    def loop(store: MetadataStore) -> None:
        sched = scheduler(clock, store)
        for _ in range(rounds):
            barrier.wait(timeout=60)
            outcomes.append(sched.tick())

    threads = [threading.Thread(target=loop, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    return outcomes


def test_two_schedulers_racing_start_one_run_per_tick(backend: str) -> None:
    keel.schedules.add("race-all", flows.plain, every="1m", catchup="all", start=T0)
    keel.schedules.add("race-latest", flows.plain, every="1m", catchup="latest", start=T0)
    keel.schedules.add(
        "race-skip", flows.plain, every="1m", overlap="skip", max_active_runs=3, start=T0
    )
    clock = Clock(T0 - timedelta(seconds=1))
    # Separate stores: separate connection pools, as in separate processes.
    stores = [MetadataStore(StoreConfig.from_env()) for _ in range(3)]
    try:
        # Some moves pass several ticks at once (so catch-up starts several per pass).
        outcomes = _race(stores, clock, 40, lambda i: 60 * (1 + i % 4) + 1)
    finally:
        for s in stores:
            s.dispose()
    assert not [o.errors for o in outcomes if o.errors]
    last = clock().timestamp()
    every_tick = [
        t.timestamp()
        for t in (T0 + timedelta(minutes=k) for k in range(200))
        if t.timestamp() <= last
    ]
    all_runs = runs_of("race-all")
    assert [r.logical_date for r in all_runs] == every_tick
    assert sum(len(o.started) for o in outcomes) == len(all_runs) + len(runs_of("race-latest")) + 3
    latest = Counter(r.logical_date for r in runs_of("race-latest"))
    assert latest and max(latest.values()) == 1
    # overlap=skip with max_active_runs=3 and nothing finishing: 3 runs, the rest skipped.
    assert len(runs_of("race-skip")) == 3
    skipped = [t for t in tick_rows("race-skip") if t.run_id is None]
    assert len(skipped) + 3 == len(tick_rows("race-skip"))
    for name in ("race-all", "race-latest"):
        recorded = tick_rows(name)
        assert Counter(t.logical_date for t in recorded).most_common(1)[0][1] == 1
        assert {t.run_id for t in recorded} == {r.id for r in runs_of(name)}


def test_two_scheduler_processes_racing_on_a_live_schedule(backend: str, tmp_path: Path) -> None:
    keel.schedules.add("live", flows.plain, every="1s", catchup="all")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    script = str(TESTS / "flows" / "schedule_flows.py")
    procs = [
        subprocess.Popen(
            [sys.executable, script, "race", "live", "4"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err
    found = runs_of("live")
    dates = [r.logical_date for r in found]
    assert len(dates) >= 3
    assert len(set(dates)) == len(dates), "a tick started two runs"
    # No tick between the first and the last was lost.
    assert dates == [dates[0] + k for k in range(len(dates))]
    started = sum(int(out.split()[3]) for out, _ in outputs)
    assert started == len(found)


# -- overlap ------------------------------------------------------------------------------------
def test_overlap_skip_records_the_skipped_tick(backend: str) -> None:
    keel.schedules.add("sk", flows.plain, every="1m", overlap="skip", catchup="all", start=T0)
    clock = Clock(T0)
    sched = scheduler(clock)
    first = sched.tick().started
    clock.advance(minutes=1)
    result = sched.tick()
    assert result.started == [] and result.skipped == 1
    assert [(t.logical_date, t.run_id) for t in tick_rows("sk")] == [
        (T0.timestamp(), first[0]),
        ((T0 + timedelta(minutes=1)).timestamp(), None),
    ]
    open_store().update_run(first[0], status="SUCCEEDED", ended_at=time.time())
    clock.advance(minutes=1)
    assert len(sched.tick().started) == 1


def test_overlap_queue_holds_extra_runs_until_a_slot_frees(backend: str) -> None:
    keel.schedules.add(
        "qu", flows.plain, every="1m", overlap="queue", max_active_runs=2, catchup="all", start=T0
    )
    clock = Clock(T0 + timedelta(minutes=3))
    assert len(scheduler(clock).tick().started) == 4  # every tick gets its run, queued
    store = open_store()
    assert queue.list_pools(store)["schedule-qu"] == 2
    claims = {f"w{i}": queue.claim(store, f"w{i}", ["default"], lease_seconds=60) for i in range(4)}
    held = {worker: c for worker, c in claims.items() if c is not None}
    assert len(held) == 2  # two run; the other two wait for a slot
    worker, first = next(iter(held.items()))
    assert queue.complete(store, first.id, worker)
    again = queue.claim(store, "w9", ["default"], lease_seconds=60)
    assert again is not None and again.run_id not in {c.run_id for c in held.values()}
    assert queue.claim(store, "w10", ["default"], lease_seconds=60) is None


def test_overlap_cancel_previous(backend: str) -> None:
    keel.schedules.add(
        "cp", flows.plain, every="1m", overlap="cancel_previous", catchup="all", start=T0
    )
    clock = Clock(T0)
    sched = scheduler(clock)
    store = open_store()
    (queued,) = sched.tick().started
    clock.advance(minutes=1)
    result = sched.tick()
    assert result.cancelled == [queued] and len(result.started) == 1
    row = store.get_run(queued)
    assert row.status == "CANCELLED" and "cancel_previous" in row.error_message
    with store.engine.connect() as conn:
        status = conn.execute(
            sa.select(queue_items.c.status).where(queue_items.c.run_id == queued)
        ).scalar()
    assert status == "done"  # no worker will pick up the cancelled run
    # A run a worker holds is asked to stop (its engine records the cancellation).
    (running,) = result.started
    claim = queue.claim(store, "w1", ["default"], lease_seconds=60)
    assert claim is not None and claim.run_id == running
    store.update_run(running, status="RUNNING", host=os.uname().nodename, pid=os.getpid())
    clock.advance(minutes=1)
    result = sched.tick()
    assert result.cancelled == [running] and len(result.started) == 1
    assert store.get_run(running).cancel_requested


# -- backfill -------------------------------------------------------------------------------
def test_backfill_counts_priority_and_ticks(backend: str) -> None:
    keel.schedules.add("live", flows.echo, cron="0 3 * * *", timezone="Europe/Paris", start=T0)
    done = keel.backfill(
        flows.echo,
        "2024-01-01",
        "2024-01-31",
        cron="0 3 * * *",
        timezone="Europe/Paris",
        params={"label": "bf"},
    )
    assert done.runs == 31 and done.already_done == 0
    assert done.schedule == "live"  # the schedule with this cadence: shares its ticks
    assert done.first == datetime(2024, 1, 1, 3, tzinfo=done.first.tzinfo)
    assert done.last is not None and done.last.day == 31
    store = open_store()
    with store.engine.connect() as conn:
        items = conn.execute(
            sa.select(queue_items.c.priority, queue_items.c.pool, sa.func.count())
            .where(queue_items.c.run_id.in_(done.run_ids))
            .group_by(queue_items.c.priority, queue_items.c.pool)
        ).all()
        slots = conn.execute(sa.select(pools.c.slots).where(pools.c.name == done.pool)).scalar()
    assert items == [(-PRIORITY_DROP, done.pool, 31)]
    assert slots == 2
    row = store.get_run(done.run_ids[0])
    assert (row.status, row.schedule, row.trigger_name) == ("PENDING", "live", done.pool)
    assert keel.Client().run(row.id).params == {
        "label": "bf",
        "logical_date": "2024-01-01T03:00:00+01:00",
    }
    assert len(tick_rows("live")) == 31
    # Backfilling again, or an overlapping range, starts nothing twice.
    again = keel.backfill("live", "2024-01-20", "2024-02-05")
    assert (again.runs, again.already_done) == (5, 12)
    # The live schedule catching up over the same days starts only what is missing.
    keel.schedules.add(
        "live",
        flows.echo,
        cron="0 3 * * *",
        timezone="Europe/Paris",
        catchup="all",
        start="2024-01-01",
        replace=True,
    )
    clock = Clock(datetime(2024, 2, 10, 12, tzinfo=UTC))
    started = scheduler(clock).tick().started
    assert len(started) == 5  # 6 .. 10 February
    dates = [r.logical_date for r in runs_of("live")]
    assert len(dates) == len(set(dates)) == 41


def test_a_1000_interval_backfill(backend: str) -> None:
    done = keel.backfill(
        flows.plain, T0, T0 + timedelta(hours=999), every="1h", max_active_runs=4, params={"n": 7}
    )
    assert done.runs == 1000
    with open_store().engine.connect() as conn:
        queued = conn.execute(
            sa.select(sa.func.count())
            .select_from(queue_items)
            .where(queue_items.c.pool == done.pool)
        ).scalar()
        recorded = conn.execute(
            sa.select(sa.func.count()).select_from(ticks).where(ticks.c.schedule == done.schedule)
        ).scalar()
    assert queued == recorded == 1000


def test_backfill_cap_holds_and_scheduled_runs_go_first(backend: str, tmp_path: Path) -> None:
    counter, log, gate = (str(tmp_path / name) for name in ("counter", "log", "gate"))
    # The backfill's runs hold their slots until the gate opens, so the scheduled run
    # certainly comes while most of them wait, however slow the machine.
    done = keel.backfill(
        flows.hold,
        T0,
        T0 + timedelta(hours=7),
        every="1h",
        max_active_runs=2,
        params={"counter": counter, "log": log, "label": "backfill", "gate": gate},
    )
    assert done.runs == 8
    keel.schedules.add(
        "fresh",
        flows.hold,
        every="1m",
        start=T0,
        params={
            "counter": str(tmp_path / "other"),
            "log": log,
            "label": "scheduled",
            "seconds": 0.05,
        },
    )
    with WorkerThread(concurrency=6):
        wait_until("backfill runs to start", lambda: os.path.exists(log))
        (scheduled,) = scheduler(Clock(T0 + timedelta(seconds=1))).tick().started
        wait_until("the scheduled run to end", lambda: finished([scheduled]))
        store = open_store()
        waiting = [r for r in done.run_ids if store.get_run(r).status == "PENDING"]
        Path(gate).touch()
        wait_until("the backfill to end", lambda: finished(done.run_ids))
    assert len(waiting) >= 6, "the scheduled run should not wait for the whole backfill"
    starts = [line.split()[1] for line in Path(log).read_text().splitlines()]
    assert starts.count("backfill") == 8 and starts.index("scheduled") <= 2
    assert flows.read_peak(counter)[1] <= 2  # never more backfill runs at once than its cap
    assert all(open_store().get_run(r).status == "SUCCEEDED" for r in done.run_ids)


def test_bad_backfills_are_clear_errors(backend: str) -> None:
    with pytest.raises(ScheduleError, match=r"end .* is before its start"):
        keel.backfill(flows.plain, "2024-02-01", "2024-01-01", every="1d")
    with pytest.raises(ScheduleError, match="exactly one of cron and every"):
        keel.backfill(flows.plain, "2024-01-01", "2024-02-01")
    with pytest.raises(ScheduleError, match="no schedule named 'nightly'"):
        keel.backfill("nightly", "2024-01-01", "2024-02-01")
    with pytest.raises(ScheduleError, match="no tick between"):
        keel.backfill(flows.plain, "2024-01-01T00:10", "2024-01-01T00:20", every="1h")
    with pytest.raises(ScheduleError, match="more than 100,000 runs"):
        keel.backfill(flows.plain, "2000-01-01", "2024-01-01", every="1m")
    with pytest.raises(ScheduleError, match="max_active_runs must be >= 1"):
        keel.backfill(flows.plain, "2024-01-01", "2024-01-02", every="1h", max_active_runs=0)
    with pytest.raises(ParameterError, match="expects int"):
        keel.backfill(flows.plain, "2024-01-01", "2024-01-02", every="1h", params={"n": "x"})
    keel.schedules.add("daily", flows.plain, every="1d")
    with pytest.raises(ScheduleError, match="uses its cadence"):
        keel.backfill("daily", "2024-01-01", "2024-01-02", every="1h")
    assert runs_of("daily") == []


# -- the command line --------------------------------------------------------------------------
def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command in this process (no interpreter start-up), for bad input."""
    from typer.testing import CliRunner

    from keel.cli.main import app

    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(
        ["keel", *args], result.exit_code, result.stdout, result.stderr
    )


def keel_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=TESTS,
    )


def test_cli_schedules_and_backfill(backend: str) -> None:
    ref = "flows.schedule_flows:echo"
    out = keel_cli(
        "schedules",
        "add",
        "nightly",
        ref,
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Paris",
        "--param",
        "label=cli",
        "--catchup",
        "none",
    )
    assert out.returncode == 0, out.stderr
    assert "schedule nightly: sched_echo cron 0 3 * * * (Europe/Paris)" in out.stdout
    listed = cli("schedules", "ls")
    assert "nightly" in listed.stdout and "none" in listed.stdout
    assert cli("schedules", "pause", "nightly").returncode == 0
    assert "paused" in cli("schedules", "show", "nightly").stdout
    bad = [
        (("schedules", "add", "x", ref, "--cron", "0 3 * *"), "bad cron expression '0 3 * *'"),
        (
            ("schedules", "add", "x", ref, "--cron", "0 3 * * *", "--tz", "Europe/Pariss"),
            "unknown time zone 'Europe/Pariss'",
        ),
        (("schedules", "add", "x", "flows.schedule_flows:nope", "--every", "1h"), "'nope'"),
        (
            (
                "schedules",
                "add",
                "x",
                ref,
                "--every",
                "1h",
                "--start",
                "2024-02-01",
                "--end",
                "2024-01-01",
            ),
            "is before its start",
        ),
        (("schedules", "pause", "nightlx"), "no schedule named 'nightlx'"),
        (
            ("backfill", ref, "--start", "2024-01-02", "--end", "2024-01-01", "--every", "1d"),
            "is before its start",
        ),
    ]
    for args, message in bad:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    filled = keel_cli(
        "backfill",
        ref,
        "--start",
        "2024-01-01",
        "--end",
        "2024-01-10",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Paris",
        "--max-active-runs",
        "3",
    )
    assert filled.returncode == 0, filled.stderr
    assert "10 runs of sched_echo queued" in filled.stdout and "at most 3 at once" in filled.stdout
    assert len(runs_of("nightly")) == 10  # the schedule's ticks: same cadence
    assert cli("schedules", "rm", "nightly").returncode == 0
    assert "no schedules" in cli("schedules", "ls").stdout


def test_a_keel_worker_process_runs_schedules(backend: str, tmp_path: Path) -> None:
    """End to end with real processes: `keel worker` starts a schedule's runs (its
    scheduler hook) and executes them."""
    keel.schedules.add("live", flows.echo, every="1s", params={"label": "proc"})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    with open(tmp_path / "worker.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS,
        )
        try:
            wait_until(
                "two scheduled runs to succeed",
                lambda: sum(r.status == "SUCCEEDED" for r in runs_of("live")) >= 2,
            )
        finally:
            proc.terminate()
            proc.wait(60)
    done = [r for r in runs_of("live") if r.status == "SUCCEEDED"]
    result = keel.Client().run(done[0].id).result()
    assert result == f"proc@{utc(done[0].logical_date).isoformat()}"


def test_keel_scheduler_registers_declared_schedules_and_starts_ticks(
    backend: str, tmp_path: Path
) -> None:
    keel.schedules.add("hourly", flows.plain, every="1h", start=T0)  # long overdue
    once = keel_cli("scheduler", "--once", "--load", str(TESTS / "flows" / "declared_flows.py"))
    assert once.returncode == 0, once.stderr
    assert "schedule declared_nightly registered (cron 30 2 * * * (Europe/Paris))" in once.stdout
    assert "tick: queued run" in once.stdout
    assert len(runs_of("hourly")) == 1  # catch-up `latest`: one run for the whole gap
    assert keel.schedules.get("every-quarter").overlap == "skip"
    # The loop: starts ticks as they come until SIGTERM.
    keel.schedules.add("second", flows.plain, every="1s")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH")) if p)
    with open(tmp_path / "scheduler.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "scheduler"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=TESTS,
        )
        try:
            wait_until("two ticks to be queued", lambda: len(runs_of("second")) >= 2)
        finally:
            proc.terminate()
            assert proc.wait(60) == 0
    assert "scheduler stopped" in (tmp_path / "scheduler.log").read_text()
    assert all(r.status == "PENDING" for r in runs_of("second"))  # it executes nothing
