"""Issue #9, item 10: a run whose owner died is shown as such, and taken over once.

A real `keel run` is killed with SIGKILL while its middle step waits for a gate file.
After its lease (a short KEEL_LEASE_SECONDS) the run shows "owner lost", since when
and `keel resume RUN` in `keel runs ls/show` and in the REST run JSON; a real `keel
server` then takes it over and finishes it; several servers and workers racing take
it over exactly once. Steps append `NAME PID` to a side-effect file, so the tests
count how often each step really ran and which process ran it: the step recorded
before the kill never runs again, the one in flight at the kill runs once more.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

import keel
from flows import owner_flows
from flows.worker_support import (  # reap_processes: an autouse fixture
    TESTS,
    Proc,
    WorkerProcess,
    child_env,
    only_run_id,
    queue_rows,
    read_lines,
    reap_processes,  # noqa: F401
    run_queue_row,
    run_row,
    store,
    succeeded_seqs,
    wait_until,
)
from keel.errors import RunStateError
from keel.store import queue
from keel.store.schema import queue_items
from server_support import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

FLOW = TESTS / "flows" / "owner_flows.py"
# The killed run's lease is short so the tests wait little; the takers' leases are
# long, so a taker on a loaded machine never loses its claim to another racer.
DEAD_LEASE = "2"
TAKER_LEASE = "30"


def keel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        cwd=TESTS.parent,
    )


class ServerProcess(Proc):
    """`python -m keel server` on a free loopback port, on this test's store."""

    def __init__(self, logs: Path, label: str, *options: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        args = [sys.executable, "-m", "keel", "server", "--port", port, *options]
        super().__init__(logs, label, args, child_env(KEEL_LEASE_SECONDS=TAKER_LEASE))

    def ready(self) -> ServerProcess:
        """Wait until it answers; itself."""

        def healthy() -> bool:
            try:
                return httpx.get(f"{self.url}/api/v1/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(f"{self.label} to answer", healthy, self)
        return self

    def run(self, run_id: str) -> dict[str, Any]:
        reply = httpx.get(f"{self.url}/api/v1/runs/{run_id}", timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's headless Chromium, driven by Selenium (as tests/test_ui.py does)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="keel-owner-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options
    )
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shown_text(driver: Any, url: str, css: str) -> str:
    """The text of the element `css` on the page at `url`, once it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    found = WebDriverWait(driver, 60, poll_frequency=0.05).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, css)
    )
    return str(found[0].text or found[0].get_attribute("title"))


def effects(out: Path) -> list[tuple[str, int]]:
    """(step name, pid) of every execution so far."""
    return [(name, int(pid)) for name, pid in (line.split() for line in read_lines(out))]


def kill_mid_run(tmp_path: Path) -> tuple[str, Path, Path, int]:
    """`keel run` the gated chain, SIGKILL it while its middle step waits for the gate
    (its first step recorded); the run id, effects file, gate file and dead pid."""
    out, gate = tmp_path / "effects.txt", tmp_path / "gate"
    args = [sys.executable, "-m", "keel", "run", f"{FLOW}:gated_chain"]
    args += ["--param", f"out={out}", "--param", f"gate={gate}"]
    flow = Proc(tmp_path, "keel-run", args, child_env(KEEL_LEASE_SECONDS=DEAD_LEASE))
    wait_until("the middle step to start", lambda: ("gated", flow.pid) in effects(out), flow)
    run_id = only_run_id("gated_chain")
    wait_until("the first step to be recorded", lambda: bool(succeeded_seqs(run_id)), flow)
    flow.kill_hard()
    assert run_row(run_id).status == "RUNNING", "a killed run stays RUNNING in the store"
    return run_id, out, gate, flow.pid


def check_taken_over_once(run_id: str, out: Path, dead_pid: int, takers: list[Proc]) -> None:
    """The first step ran once (recorded before the kill), the middle one once more
    (in flight at the kill), the last once, all after the kill in one taker, whose
    claim is the run entry's second and last."""
    done = effects(out)
    assert Counter(name for name, _ in done) == {"first": 1, "gated": 2, "last": 1}, done
    assert done[:2] == [("first", dead_pid), ("gated", dead_pid)], done
    (taker_pid,) = {pid for _, pid in done[2:]}
    assert taker_pid in {t.pid for t in takers}, done
    entry = run_queue_row(run_id)
    assert entry.status == "done"
    assert entry.claims == 2, "claimed by the killed `keel run`, then by one taker only"
    assert entry.claimed_by.startswith(f"{socket.gethostname()}:{taker_pid}:"), entry
    assert run_row(run_id).pid == taker_pid


def test_a_killed_run_shows_owner_lost_then_a_server_takes_it_over(
    backend: str, tmp_path: Path
) -> None:
    run_id, out, gate, dead_pid = kill_mid_run(tmp_path)

    def listed_lost() -> bool:
        return "owner lost" in keel_cli("runs", "ls").stdout

    wait_until("`keel runs ls` to show the owner lost", listed_lost)
    listed = keel_cli("runs", "ls")
    assert listed.returncode == 0, listed.stderr
    assert f"{run_id}: owner lost since " in listed.stdout, listed.stdout
    assert f"resume it with: keel resume {run_id}" in listed.stdout, listed.stdout
    assert f":{dead_pid}:foreground" in listed.stdout, listed.stdout
    shown = keel_cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^owner +lost since ", shown.stdout, re.M), shown.stdout
    assert f"keel resume {run_id}" in shown.stdout, shown.stdout

    # A server told not to take runs over shows it over REST, and leaves it alone.
    watcher = ServerProcess(tmp_path, "watcher", "--no-takeover").ready()
    body = watcher.run(run_id)
    assert body["status"] == "RUNNING"
    lost = body["owner_lost"]
    assert lost["resume_command"] == f"keel resume {run_id}", body
    assert lost["owner"].endswith(f":{dead_pid}:foreground"), body
    assert lost["since"] >= body["started_at"], body
    page = httpx.get(f"{watcher.url}/api/v1/runs", timeout=60).json()
    (item,) = [r for r in page["runs"] if r["id"] == run_id]
    assert item["owner_lost"] == lost
    with chromium() as driver:
        box = shown_text(driver, f"{watcher.url}/runs/{run_id}", "#owner-lost")
        assert "Owner lost" in box and f"keel resume {run_id}" in box, box
        row = f'tr[data-run-id="{run_id}"] [data-owner-lost]'
        assert shown_text(driver, f"{watcher.url}/", row).lower() == "owner lost"
        title = driver.find_element("css selector", row).get_attribute("title")
        assert f"keel resume {run_id}" in title, title

    # A server that takes runs over (the default) continues it from its record.
    gate.touch()
    taker = ServerProcess(tmp_path, "taker")
    wait_until(
        "the server to finish the run",
        lambda: watcher.run(run_id)["status"] == "SUCCEEDED",
        taker,
        watcher,
    )
    assert watcher.run(run_id)["owner_lost"] is None
    check_taken_over_once(run_id, out, dead_pid, [taker])
    result = keel_cli("runs", "ls")
    assert "owner lost" not in result.stdout, result.stdout


def test_servers_and_a_worker_racing_take_a_run_over_exactly_once(
    backend: str, tmp_path: Path
) -> None:
    run_id, out, gate, dead_pid = kill_mid_run(tmp_path)
    gate.touch()
    # All three start at once and look for runs to take over as soon as they are up.
    takers: list[Proc] = [
        WorkerProcess(tmp_path, "worker", "default", lease=float(TAKER_LEASE)),
        ServerProcess(tmp_path, "server-1"),
        ServerProcess(tmp_path, "server-2"),
    ]
    wait_until(
        "one of the takers to finish the run",
        lambda: run_row(run_id).status == "SUCCEEDED",
        *takers,
    )
    check_taken_over_once(run_id, out, dead_pid, takers)


def test_resume_respects_a_live_lease_elsewhere_and_takes_a_lost_one(
    backend: str, tmp_path: Path
) -> None:
    """keel cannot look at processes on another host: it trusts their lease."""
    out, gate = tmp_path / "effects.txt", tmp_path / "gate"
    gate.touch()
    handle = keel.run(owner_flows.gated_chain, out=str(out), gate=str(gate))
    assert handle.status == "SUCCEEDED"
    # The run as if another host drove it now: RUNNING, its entry claimed there.
    st = store()
    st.update_run(handle.id, status="RUNNING", ended_at=None, host="elsewhere", pid=1)
    elsewhere = "elsewhere:1:foreground"
    claim = queue.take_run(st, handle.id, elsewhere, queue="default", priority=0, lease_seconds=600)
    assert claim is not None
    assert queue.take_run(st, handle.id, "another:2:x", queue="default", priority=0,
                          lease_seconds=600) is None  # fmt: skip
    with pytest.raises(RunStateError, match="still running"):
        keel.resume(handle.id)
    assert queue.lost_owners(st, [handle.id]) == {}

    # That owner's lease runs out: the run's owner is lost, and resuming needs no force.
    with st.engine.begin() as conn:
        conn.execute(
            queue_items.update()
            .where(queue_items.c.id == claim.id)
            .values(lease_until=time.time() - 1)
        )
    assert queue.lost_owners(st, [handle.id])[handle.id].owner == elsewhere
    assert keel.resume(handle.id).status == "SUCCEEDED"
    assert Counter(name for name, _ in effects(out)) == {"first": 1, "gated": 1, "last": 1}
    entry = run_queue_row(handle.id)
    assert (entry.status, entry.claims) == ("done", 3), "keel.run, elsewhere, the resume"
    assert queue.lost_owners(st, [handle.id]) == {}


def test_cancelling_a_run_whose_owner_is_lost_ends_it_for_takers_too(
    backend: str, tmp_path: Path
) -> None:
    out, gate = tmp_path / "effects.txt", tmp_path / "gate"
    gate.touch()
    handle = keel.run(owner_flows.gated_chain, out=str(out), gate=str(gate))
    # The run as if its owner on another host died: RUNNING, a lease that ran out.
    st = store()
    st.update_run(handle.id, status="RUNNING", ended_at=None, host="elsewhere", pid=1)
    claim = queue.take_run(
        st, handle.id, "elsewhere:1:foreground", queue="default", priority=0, lease_seconds=-1
    )
    assert claim is not None and handle.id in queue.lost_owners(st, [handle.id])
    assert keel.cancel(handle.id) == "CANCELLED"
    # Cancelling closes the run's whole tree, its own queue entry included.
    assert queue_rows(dedupe=f"run:{handle.id}") == []
    assert queue.claim_lost_run(st, "taker", lease_seconds=30) is None
    assert queue.lost_owners(st, [handle.id]) == {}
