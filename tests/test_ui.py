"""The web UI in a real headless Chromium against a real `keel server`.

The server is a `python -m keel server` subprocess on a free loopback port, on a
store (SQLite under a KEEL_HOME of this module) that the tests fill by running
workflows from tests/flows/ui_flows.py in this process; the server registers the
same file, so its launch page can start them too. Chromium and ChromeDriver are
Debian's (`make test` installs them: scripts/ensure-chromium.sh), driven by Selenium.

Nothing here waits for a fixed time: every wait is for something to appear on the
page (with a generous upper bound), and runs that must still be going when the
page is looked at wait for a file the test creates afterwards.

Screenshots go to build/test-output/ui (or $KEEL_TEST_OUTPUT/ui).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import keel

ROOT = Path(__file__).resolve().parents[1]
FLOWS = ROOT / "tests" / "flows" / "ui_flows.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 60.0  # upper bound for anything to show up; never a measured duration

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from flows import ui_flows  # noqa: E402

pytestmark = pytest.mark.integration


def _output_dir() -> Path:
    base = Path(os.environ.get("KEEL_TEST_OUTPUT", ROOT / "build" / "test-output"))
    out = base / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return json.loads(reply.read())


class Site:
    """The server under test: its URL, its store's KEEL_HOME, runs made for the tests."""

    def __init__(self, url: str, home: Path) -> None:
        self.url = url
        self.home = home
        self.runs: dict[str, str] = {}

    def api(self, path: str) -> Any:
        return _get_json(f"{self.url}/api/v1{path}")

    def status(self, path: str) -> int:
        """The HTTP status of a GET of an API path (without a token)."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1{path}", timeout=60) as reply:
                return int(reply.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("ui-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEEL_HOME", str(home))
        mp.delenv("KEEL_DB_URL", raising=False)
        made = {
            "train_a": keel.run(ui_flows.ui_train, lr=0.1).id,
            "train_b": keel.run(ui_flows.ui_train, lr=0.3).id,
            "train_c": keel.run(ui_flows.ui_train, lr=0.5).id,
            "broken": keel.run(ui_flows.ui_broken).id,
            "register": keel.run(ui_flows.ui_register).id,
        }
    port = _free_port()
    # The server runs this checkout's keel (src/), not whichever one is installed.
    paths = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    env = {**os.environ, "KEEL_HOME": str(home), "PYTHONPATH": paths}
    env.pop("KEEL_DB_URL", None)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "server", "--port", str(port), "--workflows", str(FLOWS)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT
    while True:
        try:
            if _get_json(f"{url}/api/v1/health")["status"] == "ok":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            pytest.fail(f"keel server did not start:\n{(home / 'server.log').read_text()}")
        time.sleep(0.05)
    found = Site(url, home)
    found.runs = made
    try:
        yield found
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(autouse=True)
def same_store(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs a test starts in this process land in the server's store."""
    monkeypatch.setenv("KEEL_HOME", str(site.home))


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (make browser)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="keel-ui-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser: WebDriver, site: Site) -> Iterator[Page]:
    browser.set_window_size(1280, 1000)
    yield Page(browser, site)
    # No page may log a JavaScript error (a failed fetch the page handles is fine).
    errors = [
        e["message"]
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]
    assert not errors, errors


class Page:
    def __init__(self, driver: WebDriver, site: Site) -> None:
        self.driver = driver
        self.site = site

    def open(self, path: str) -> None:
        self.driver.get(self.site.url + path)
        self.wait(
            lambda: self.driver.execute_script("return !document.querySelector('main > .loading')")
        )

    def wait(self, cond: Callable[[], Any], what: str = "the page to change") -> Any:
        def check(_: WebDriver) -> Any:
            try:
                return cond()
            except StaleElementReferenceException:
                return False

        try:
            return WebDriverWait(self.driver, WAIT, poll_frequency=0.05).until(check)
        except TimeoutException:
            self.shot("timeout")
            server_log = (self.site.home / "server.log").read_text(errors="replace")[-4000:]
            raise AssertionError(
                f"gave up waiting for {what} on {self.driver.current_url}\n"
                f"page text: {self.driver.find_element(By.TAG_NAME, 'main').text[:2000]}\n"
                f"server log (end): {server_log}"
            ) from None

    def find(self, css: str) -> WebElement:
        return self.wait(lambda: self.driver.find_element(By.CSS_SELECTOR, css), css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        """The element's text (read again if a live redraw replaced the element)."""
        found = self.wait(lambda: (self.driver.find_element(By.CSS_SELECTOR, css).text,), css)
        return str(found[0])

    def shot(self, name: str) -> Path:
        path = _output_dir() / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def _classes(el: WebElement) -> set[str]:
    return set((el.get_attribute("class") or "").split())


# -- runs list ---------------------------------------------------------------------------


def test_runs_list_shows_runs_with_their_status(page: Page) -> None:
    runs = page.site.runs
    page.open("/")
    row = page.find(f"tr[data-run-id='{runs['broken']}']")
    assert row.get_attribute("data-status") == "FAILED"
    assert "failed" in row.find_element(By.CSS_SELECTOR, ".badge").text
    for key in ("train_a", "train_b", "train_c", "register"):
        ok = page.find(f"tr[data-run-id='{runs[key]}']")
        assert ok.get_attribute("data-status") == "SUCCEEDED"
    assert "ui_train" in page.text(f"tr[data-run-id='{runs['train_a']}']")
    page.shot("runs")

    # The status filter goes to the server and into the URL.
    page.open("/?status=FAILED")
    page.wait(lambda: len(page.all("tr[data-run-id]")) == 1, "only the failed run")
    assert page.all("tr[data-run-id]")[0].get_attribute("data-run-id") == runs["broken"]
    # Search by an id prefix.
    page.open(f"/?q={runs['train_b'][:14]}")
    page.wait(
        lambda: (
            [r.get_attribute("data-run-id") for r in page.all("tr[data-run-id]")]
            == [runs["train_b"]]
        )
    )


def test_runs_list_pages_through_the_cursor(page: Page) -> None:
    runs = page.site.runs
    newest_first = [runs["train_c"], runs["train_b"], runs["train_a"]]

    def shown() -> list[str | None]:
        return [r.get_attribute("data-run-id") for r in page.all("tr[data-run-id]")]

    def go(label: str) -> None:
        link = next(a for a in page.all(".pager a") if label in a.text)
        before = page.driver.current_url
        link.click()
        page.wait(lambda: page.driver.current_url != before, f"the {label} page")

    page.open("/?workflow=ui_train&limit=2")
    page.wait(lambda: shown() == newest_first[:2], "the first page")
    go("Older")
    page.wait(lambda: shown() == newest_first[2:], "the second page")
    assert not [a for a in page.all(".pager a") if "Older" in a.text]
    go("Newer")
    page.wait(lambda: shown() == newest_first[:2], "the first page again")
    assert "cursor=" not in page.driver.current_url


def test_narrow_window_still_lists_runs(page: Page, browser: WebDriver) -> None:
    browser.set_window_size(400, 900)
    page.open("/")
    row = page.find(f"tr[data-run-id='{page.site.runs['broken']}']")
    assert row.is_displayed()
    assert row.find_element(By.CSS_SELECTOR, "td.id a").is_displayed()
    assert row.find_element(By.CSS_SELECTOR, ".badge").is_displayed()
    # The page itself does not scroll sideways; optional columns are hidden.
    width = browser.execute_script("return document.documentElement.clientWidth")
    scroll = browser.execute_script("return document.documentElement.scrollWidth")
    assert scroll <= width + 1
    assert not row.find_element(By.CSS_SELECTOR, "td.col-opt").is_displayed()
    page.shot("runs-narrow")


# -- a run -------------------------------------------------------------------------------


def test_run_page_draws_the_dag_with_statuses(page: Page) -> None:
    run_id = page.site.runs["train_a"]
    page.open(f"/runs/{run_id}")
    nodes = {
        n.get_attribute("data-key"): n
        for n in page.wait(lambda: page.all(".dag .node[data-key]") or None)
    }
    assert set(nodes) == {"prepare-0", "train-1", "report-2"}
    for node in nodes.values():
        assert "succeeded" in _classes(node)
        assert node.get_attribute("data-status") == "SUCCEEDED"
    assert len(page.all(".dag path.edge")) == 2  # prepare -> train -> report
    assert page.text("#run-status .badge") == "succeeded"
    assert len(page.all("#run-timeline .gantt .span")) == 3
    assert "final loss" in page.text("#run-result")
    assert "lr" in page.text("#run-params") and "0.1" in page.text("#run-params")
    page.shot("run")

    # A node is a link to its step.
    page.find(".dag .node[data-key='train-1'] a").click()
    page.wait(lambda: page.driver.current_url.endswith(f"/runs/{run_id}/steps/train-1"))
    assert page.find("h1").get_attribute("textContent") == "Step train-1"


def test_failed_run_shows_the_error_and_its_failed_step(page: Page) -> None:
    page.open(f"/runs/{page.site.runs['broken']}")
    node = page.find(".dag .node[data-key='explode-0']")
    assert "failed" in _classes(node)
    alert = page.find("[role=alert]")
    assert "cannot handle 3" in alert.text
    # Finished, not succeeded: resume and retry are offered, cancel is not.
    labels = [b.text for b in page.all(".page-head .actions button")]
    assert "Resume" in labels and "Retry" in labels and "Cancel" not in labels


def test_unknown_run_is_a_readable_error(page: Page) -> None:
    page.open("/runs/no-such-run")
    alert = page.find("[role=alert]")
    assert "no-such-run" in alert.text
    page.open("/nothing/here")
    assert page.text("h1") == "Page not found"


def test_a_running_run_updates_live(page: Page, tmp_path: Path) -> None:
    """Open a run while its steps wait, then let them go: the graph, the status and
    a step's log tail follow without a reload."""
    flag = tmp_path / "go"
    done: dict[str, Any] = {}

    def work() -> None:
        try:
            done["id"] = keel.run(ui_flows.ui_gated, flag=str(flag), n=3).id
        except BaseException as exc:  # reported by the assertion below
            done["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        client = keel.Client()

        def running_run() -> str | None:
            found = client.runs(workflow="ui_gated", status="RUNNING", limit=1)
            if not found:
                return None
            waiting = [s for s in found[0].steps if s.task == "gate" and s.status == "RUNNING"]
            return found[0].id if len(waiting) == 3 else None

        run_id = page.wait(running_run, "the gated run to start its steps")

        # A first tab follows the log of one of the waiting steps: what it printed so
        # far is recorded while it runs (live logs) and shows up in the tail.
        page.open(f"/runs/{run_id}/steps/gate-0")
        page.wait(lambda: "running" in page.text("h1 + .subtitle .badge"), "the step's status")
        page.wait(lambda: "tailing" in page.text("#step-logs .live"), "the log tail")
        page.wait(lambda: "part 0 waiting" in page.text("#step-log"), "the running step's log")
        assert "part 0 through" not in page.text("#step-log")
        log_tab = page.driver.current_window_handle
        page.driver.switch_to.new_window("tab")
        page.open(f"/runs/{run_id}")
        page.wait(
            lambda: len(page.all(".dag .node.running[data-key^='gate-']")) == 3, "running nodes"
        )
        assert page.text("#run-status .badge") == "running"
        page.shot("run-live-running")

        flag.write_text("go")
        page.wait(
            lambda: (
                {n.get_attribute("data-status") for n in page.all(".dag .node[data-key]")}
                == {"SUCCEEDED"}
                and len(page.all(".dag .node[data-key]")) == 4
            ),
            "every node to turn succeeded",
        )
        page.wait(lambda: page.text("#run-status .badge") == "succeeded", "the run's status")
        assert page.all(".dag .node[data-key='total-3']")
        page.shot("run-live-done")

        page.driver.close()
        page.driver.switch_to.window(log_tab)
        page.wait(lambda: "part 0 through" in page.text("#step-log"), "the log tail")
        assert "part 0 waiting" in page.text("#step-log")
        page.wait(lambda: "succeeded" in page.text("h1 + .subtitle .badge"), "the step's status")
    finally:
        flag.write_text("go")
        thread.join(timeout=WAIT)
    assert "error" not in done, done.get("error")


def test_cancel_resume_and_retry_buttons(page: Page) -> None:
    """A run waiting in the queue (no worker serves it) is cancelled from its page,
    resumed (the server runs it), then retried: each button's effect shows."""
    request = urllib.request.Request(
        f"{page.site.url}/api/v1/workflows/ui_launch/runs",
        data=json.dumps({"params": {"count": 7}, "dispatch": "queue"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        run_id = json.loads(reply.read())["run"]["id"]

    def button(label: str) -> WebElement:
        return page.wait(
            lambda: next(b for b in page.all(".page-head .actions button") if b.text == label),
            f"the {label} button",
        )

    page.open(f"/runs/{run_id}")
    page.wait(lambda: page.text("#run-status .badge") == "pending")
    button("Cancel").click()
    page.driver.switch_to.alert.accept()  # "Cancel run …?"
    page.wait(lambda: page.text("#run-status .badge") == "cancelled", "the cancelled run")
    assert "cancelled" in page.text("#action-status")

    button("Resume").click()
    page.wait(lambda: page.text("#run-status .badge") == "succeeded", "the resumed run")
    page.wait(lambda: '"count": 7' in page.text("#run-result"), "its result")

    button("Retry").click()
    page.wait(lambda: not page.driver.current_url.endswith(run_id), "the new run's page")
    page.wait(lambda: page.text("#run-status .badge") == "succeeded", "the retry")
    new_id = page.driver.current_url.rsplit("/", 1)[-1]
    assert page.site.api(f"/runs/{new_id}")["retry_of"] == run_id


def test_demo_pipeline_run(page: Page) -> None:
    """The README's demo (examples/digits.py, fewer folds): its graph folds the sweep's
    20 `evaluate` steps into one node that unfolds on a key press."""
    from keel.sdk.loader import load_workflow

    digits = load_workflow(str(ROOT / "examples" / "digits.py") + ":digits")
    run_id = keel.run(digits, n_folds=2).id
    page.open(f"/runs/{run_id}")
    group = page.find(".dag .node.group")
    assert group.get_attribute("data-status") == "SUCCEEDED"
    assert "evaluate \u00d720" in group.text and "20 succeeded" in group.text
    keys = {n.get_attribute("data-key") for n in page.all(".dag .node[data-key]")}
    assert {"load_dataset-0", "split-1", "pick_best-22", "refit-23", "score_test-24"} <= keys
    assert all("succeeded" in _classes(n) for n in page.all(".dag .node[data-key]"))
    page.shot("demo-run")

    group.find_element(By.CSS_SELECTOR, "[role=button]").send_keys("\n")  # Enter unfolds it
    page.wait(lambda: len(page.all(".dag .node[data-key^='evaluate-']")) == 20, "the sweep")
    assert not page.all(".dag .node.group")

    page.open(f"/runs/{run_id}/steps/load_dataset-0")
    page.wait(lambda: "loaded 1797 images" in page.text("#step-log"), "the step's log")


# -- a step ------------------------------------------------------------------------------


def test_step_page_shows_logs_output_and_lineage(page: Page) -> None:
    run_id = page.site.runs["train_a"]
    page.open(f"/runs/{run_id}/steps/prepare-0")
    page.wait(lambda: "preparing 5 rows" in page.text("#step-log"), "the step's log")
    table = page.find("#step-output table")
    headers = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert "x" in headers and "y" in headers
    assert "train-1" in page.text("#step-lineage")  # downstream
    page.shot("step")

    page.open(f"/runs/{run_id}/steps/train-1")
    page.wait(lambda: "epoch 5: loss" in page.text("#step-log"), "the training log")
    lineage = page.find("#step-lineage")
    page.wait(lambda: "prepare-0" in lineage.text and "report-2" in lineage.text)
    # The input (prepare's table) is previewed in place.
    page.wait(lambda: page.all("#step-inputs details[open] table"), "the input's preview")
    assert '"loss"' in page.text("#step-output")
    assert "loss" in page.text("#step-data")  # metrics the step logged
    # Files the step logged: a figure previewed as an image, a dict as JSON.
    figure = page.find("#step-data details.file[data-path='plots/loss.png']")
    figure.find_element(By.TAG_NAME, "summary").click()
    image = page.wait(lambda: figure.find_elements(By.CSS_SELECTOR, "img"), "the image")[0]
    page.wait(lambda: page.driver.execute_script("return arguments[0].naturalWidth", image) > 0)
    config = page.find("#step-data details.file[data-path='config.json']")
    config.find_element(By.TAG_NAME, "summary").click()
    page.wait(lambda: '"lr": 0.1' in config.text, "the JSON preview")
    page.shot("step-files")


# -- experiments -------------------------------------------------------------------------


def _experiment_id(site: Site, name: str) -> int:
    return int(next(e["id"] for e in site.api("/experiments") if e["name"] == name))


def test_experiment_table_chart_and_compare(page: Page) -> None:
    runs = page.site.runs
    exp = _experiment_id(page.site, "ui_train")
    page.open("/experiments")
    page.find(f"a[href='/experiments/{exp}']")

    page.open(f"/experiments/{exp}?steps=1")
    # The loss of each run's train step, overlaid in one chart.
    chart = page.find("figure.chart[data-metric='loss']")
    page.wait(lambda: chart.find_elements(By.CSS_SELECTOR, "canvas"), "the chart's canvas")
    assert chart.get_attribute("data-series") == "3"
    legend = chart.find_elements(By.CSS_SELECTOR, ".u-legend .u-series")
    assert len(legend) == 4  # the x axis (step) and three runs
    assert any(runs["train_b"] in s.text for s in legend)
    page.shot("experiment")

    # The table sorts by a metric column.
    page.open(f"/experiments/{exp}")
    header = page.wait(
        lambda: next(b for b in page.all("th button.sort") if b.text == "final_loss"), "column"
    )
    header.click()  # numbers sort high to low first
    ordered = [r.get_attribute("data-ref") for r in page.all("tbody tr[data-ref]")]
    assert ordered == [runs["train_a"], runs["train_b"], runs["train_c"]]
    header.click()
    ordered = [r.get_attribute("data-ref") for r in page.all("tbody tr[data-ref]")]
    assert ordered == [runs["train_c"], runs["train_b"], runs["train_a"]]

    # Select two runs and compare them.
    for key in ("train_a", "train_c"):
        page.find(f"input[type=checkbox][data-ref='{runs[key]}']").click()
    compare = next(b for b in page.all(".page-head button") if b.text == "Compare selected")
    page.wait(lambda: compare.is_enabled())
    compare.click()
    page.wait(lambda: "/compare?runs=" in page.driver.current_url)
    lr = page.find("tr[data-param='lr']")
    assert "changed-row" in _classes(lr)
    assert "0.1" in lr.text and "0.5" in lr.text
    assert "changed-row" not in _classes(page.find("tr[data-param='epochs']"))
    page.find("tr[data-metric='final_loss']")
    # final_loss was logged once per run: one dot for each on a shared axis.
    chart = page.find("#compare-charts figure.chart[data-metric='final_loss']")
    assert chart.get_attribute("data-series") == "2"
    assert len(chart.find_elements(By.CSS_SELECTOR, "svg.dotplot line.dot")) == 2
    page.shot("compare")


# -- models ------------------------------------------------------------------------------


def test_models_page_lists_the_registered_model_and_its_lineage(page: Page) -> None:
    page.open("/models")
    row = page.find("tr[data-model='ui_model']")
    assert "@champion" in row.text
    row.find_element(By.CSS_SELECTOR, "a").click()
    page.wait(lambda: page.driver.current_url.endswith("/models/ui_model"))
    assert page.find("tr[data-version='1']")
    lineage = page.find("#model-lineage section[data-version='1']")
    page.wait(lambda: "fit-1" in lineage.text and "prepare-0" in lineage.text, "the lineage")
    assert page.site.runs["register"] in lineage.text
    page.shot("model")


def test_model_page_shows_the_servers_serving_it(page: Page) -> None:
    with keel.serve("models:/ui_model@champion", port=0, background=True) as server:
        page.open("/models/ui_model")
        row = page.find("#model-deployments tr[data-deployment]")
        page.wait(lambda: f"{server.url}/" in row.text, "the server's URL")
        assert row.get_attribute("data-deployment") == server.deployment_id
        assert "v1" in row.text and "serving" in row.text


def test_model_page_shows_traffic_and_the_requests_a_version_answered(page: Page) -> None:
    import httpx

    from keel.store import deployments
    from keel.store.metadata import open_store

    body = {"dataframe_split": {"columns": ["x"], "data": [[2.0], [3.0]]}}
    with keel.serve(
        "models:/ui_model@champion", port=0, background=True, log_requests=True
    ) as server:
        for _ in range(5):
            assert httpx.post(f"{server.url}/invocations", json=body, timeout=WAIT).is_success
        bad = httpx.post(f"{server.url}/invocations", json={"dataframe_split": {}}, timeout=WAIT)
        assert bad.status_code >= 400

        def counted() -> bool:  # the heartbeat carries the traffic (every 2 s)
            row = deployments.get(open_store(), server.deployment_id)
            return row is not None and row.requests == 6 and row.p95_ms is not None

        page.wait(counted, "a heartbeat with the server's traffic")
        page.open("/models/ui_model#v1")
        row = page.find(f"#model-deployments tr[data-deployment='{server.deployment_id}']")
        rate = row.find_element(By.CSS_SELECTOR, "[data-stat='rate']").text
        latency = row.find_element(By.CSS_SELECTOR, "[data-stat='latency']").text
        errors = row.find_element(By.CSS_SELECTOR, "[data-stat='errors']").text
        assert float(rate) > 0
        p50, p95 = (float(x.strip().removesuffix(" ms")) for x in latency.split("/"))
        assert 0 < p50 <= p95
        assert errors == "1 of 6"
        page.wait(lambda: len(page.all("#model-inferences tr[data-inference]")) >= 6, "requests")
        logged = page.all("#model-inferences tr[data-inference]")
        statuses = [r.get_attribute("data-status") for r in logged[:6]]
        assert sorted(statuses) == ["200"] * 5 + [str(bad.status_code)]
        ok = next(r for r in logged if r.get_attribute("data-status") == "200")
        cells = [td.text for td in ok.find_elements(By.TAG_NAME, "td")]
        assert cells[1] == "200" and cells[2].endswith(" ms") and cells[3] == "[[2],[3]]"
        assert len(json.loads(cells[4])) == 2  # a prediction per input row
        page.shot("model-traffic")


# -- launch ------------------------------------------------------------------------------


def test_launch_form_shows_validation_and_starts_a_run(page: Page) -> None:
    page.open("/launch?workflow=ui_launch")
    count = page.find("#p-count")
    assert count.get_attribute("aria-required") == "true"
    # Required and empty: stopped in the page.
    page.find("#launch-form button[type=submit]").click()
    page.wait(lambda: page.text("#p-count-error"), "the required message")

    count.send_keys("abc")
    page.find("#launch-form button[type=submit]").click()
    page.wait(lambda: "integer" in page.text("#p-count-error"), "the server's message")
    assert count.get_attribute("aria-invalid") == "true"
    assert "count" in page.text("#launch-errors [role=alert]")
    page.shot("launch-invalid")

    count.clear()
    count.send_keys("3")
    page.find("#p-note").send_keys("from the browser")
    page.find("#launch-form button[type=submit]").click()
    page.wait(lambda: "/runs/" in page.driver.current_url, "the new run's page")
    page.wait(lambda: page.text("#run-status .badge") == "succeeded", "the run to finish")
    page.wait(lambda: "from the browser" in page.text("#run-result"), "the result")
    run_id = page.driver.current_url.rsplit("/", 1)[-1]
    assert page.site.api(f"/runs/{run_id}")["params"]["count"] == 3


# -- keyboard and landmarks ---------------------------------------------------------------


def test_keyboard_basics(page: Page) -> None:
    page.open(f"/runs/{page.site.runs['train_a']}")
    driver = page.driver
    # The page's heading has the focus after a navigation inside the app.
    page.find("nav .nav a[href='/experiments']").click()
    page.wait(lambda: driver.execute_script("return document.activeElement.tagName") == "H1")
    assert driver.execute_script("return document.activeElement.textContent") == "Experiments"
    # Landmarks, a skip link, and DAG nodes that are links in the tab order.
    page.open(f"/runs/{page.site.runs['train_a']}")
    assert page.all("header") and page.all("main#main") and page.all("nav[aria-label=Main]")
    assert page.find("a.skip-link").get_attribute("href").endswith("#main")
    link = page.find(".dag .node[data-key='prepare-0'] a")
    assert link.get_attribute("aria-label") == "Step prepare-0, succeeded"
    # Every form control of the launch page has a label.
    page.open("/launch")
    unlabeled = driver.execute_script(
        "return [...document.querySelectorAll('main input, main select, main textarea')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))"
        ".map(e => e.id || e.name)"
    )
    assert unlabeled == []


# -- API tokens ----------------------------------------------------------------------------


def test_a_server_with_tokens_asks_for_one(page: Page) -> None:
    """Once a token exists the API refuses anonymous calls: the page says so and takes
    a token; a viewer's token reads but cannot launch (the 403 is shown). Revoking it
    does not open the server again, so this test comes last in the module."""
    from keel.server.auth import create_token, revoke_token
    from keel.store.metadata import open_store

    store = open_store()
    secret = create_token(store, "ui-viewer", "viewer")
    try:
        # The server caches for a moment whether tokens exist: wait until it wants one.
        page.wait(lambda: page.site.status("/runs?limit=1") == 401, "the server to want a token")
        page.open("/")
        alert = page.find("[role=alert]")
        assert "API token" in alert.text
        page.find("#api-token").send_keys(secret)
        page.find(".token-form button[type=submit]").click()
        page.find(f"tr[data-run-id='{page.site.runs['broken']}']")

        page.open("/launch?workflow=ui_launch")
        page.find("#p-count").send_keys("1")
        page.find("#launch-form button[type=submit]").click()
        page.wait(lambda: "operator" in page.text("#launch-errors"), "the 403 message")
    finally:
        revoke_token(store, "ui-viewer")
        page.driver.execute_script("window.localStorage.clear()")
    # A token has existed: anonymous callers stay refused, whatever was revoked.
    assert page.site.status("/runs?limit=1") == 401
