"""The `keel` command line, run as users run it: a real subprocess (`python -m keel`)
on this test's store (KEEL_HOME from the autouse fixture, inherited through the
environment). Assertions are on exit codes and text, never on time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import keel
from keel.cli.main import app

FLOWS = Path(__file__).parent / "cli_flows.py"
RUN_ID = re.compile(r"\brun ([0-9a-z]{16})\b")
WAIT_SECONDS = 120.0

pytestmark = pytest.mark.integration


def keel_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keel", *map(str, args)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        cwd=cwd,
        timeout=WAIT_SECONDS,
    )


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The same command in this process (faster: no start-up), for commands that read."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(
        ["keel", *map(str, args)], result.exit_code, result.stdout, result.stderr
    )


def flow(name: str) -> str:
    return f"{FLOWS}:{name}"


def run_id_of(result: subprocess.CompletedProcess[str]) -> str:
    found = RUN_ID.findall(result.stdout + result.stderr)
    assert found, f"no run id in the output:\n{result.stdout}\n{result.stderr}"
    return str(found[0])


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A one-line `error:` (plus hint) on stderr, the exit code, and no traceback anywhere."""
    both = result.stdout + result.stderr
    assert result.returncode == code, both
    assert result.stderr.startswith("error: "), both
    assert "Traceback" not in both, both
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"


# -- basics --------------------------------------------------------------------------------
def test_help_lists_commands_and_version_prints() -> None:
    result = keel_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "resume", "retry", "cancel", "logs", "runs", "artifacts", "cache"):
        assert command in result.stdout
    version = keel_cli("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"keel {keel.__version__}"


def test_help_does_not_import_the_heavy_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "keel", "--help"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=WAIT_SECONDS,
    )
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    for heavy in ("sqlalchemy", "pydantic", "keel.engine", "keel.client", "rich.live"):
        assert heavy not in imported, f"`keel --help` imports {heavy}"


def test_in_process_errors_are_one_line_too() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["runs", "show", "nosuchrun"])
    assert result.exit_code == 2
    assert "error: no run with id 'nosuchrun'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert runner.invoke(app, ["--version"]).output.strip() == f"keel {keel.__version__}"


# -- keel run -----------------------------------------------------------------------------------
def test_run_prints_id_status_and_result(backend: str) -> None:
    result = keel_cli("run", flow("greet"), "--param", "times=2", "-p", "word=hi")
    assert result.returncode == 0, result.stdout + result.stderr
    rid = run_id_of(result)
    assert "SUCCEEDED" in result.stdout
    assert "result: ['HI', 'HI']" in result.stdout
    assert "2 (2 succeeded)" in result.stdout
    run = keel.Client().run(rid)
    assert run.status == "SUCCEEDED"
    assert run.params == {"word": "hi", "times": 2}


def test_run_by_module_reference_and_on_processes(tmp_path: Path) -> None:
    result = keel_cli("run", "cli_flows:sum_squares", "-p", "n=4", cwd=FLOWS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "result: 14" in result.stdout
    pooled = keel_cli("run", flow("sum_squares"), "-p", "n=5", "--executor", "processes")
    assert pooled.returncode == 0, pooled.stdout + pooled.stderr
    assert "result: 30" in pooled.stdout


def test_unknown_file() -> None:
    assert_clean_error(keel_cli("run", "no/such/flows.py:wf"), 2, "no such file: no/such/flows.py")


def test_unknown_workflow_lists_the_ones_there() -> None:
    result = keel_cli("run", flow("nope"))
    assert_clean_error(result, 2, "'nope'", "does not exist")
    assert "cached, failing, failing_child, greet, parent" in result.stderr


def test_unknown_module() -> None:
    assert_clean_error(keel_cli("run", "no_such_module_here:wf"), 2, "no_such_module_here")


def test_module_that_fails_to_import(tmp_path: Path) -> None:
    broken = tmp_path / "broken.py"
    broken.write_text("import keel\n\ndef oops(:\n    pass\n")
    assert_clean_error(keel_cli("run", f"{broken}:wf"), 2, "SyntaxError", "line 3")
    raising = tmp_path / "raising.py"
    raising.write_text("raise RuntimeError('config missing')\n")
    assert_clean_error(keel_cli("run", f"{raising}:wf"), 2, "RuntimeError: config missing")


def test_bad_param_type_names_parameter_type_and_value() -> None:
    result = keel_cli("run", flow("sum_squares"), "--param", "n=lots")
    assert_clean_error(result, 2, "'n'", "int", "'lots'")


def test_missing_unknown_and_malformed_params() -> None:
    assert_clean_error(keel_cli("run", flow("sum_squares")), 2, "needs parameter 'n'")
    assert_clean_error(
        keel_cli("run", flow("sum_squares"), "-p", "n=1", "-p", "m=2"), 2, "no parameter 'm'"
    )
    assert_clean_error(keel_cli("run", flow("sum_squares"), "-p", "n"), 2, "name=value")
    bad_option = keel_cli("run", flow("sum_squares"), "--executor", "nowhere")
    assert bad_option.returncode == 2
    assert "Traceback" not in bad_option.stderr


def test_failing_task_exits_1_and_runs_show_has_the_traceback(backend: str) -> None:
    result = keel_cli("run", flow("failing"))
    assert result.returncode == 1, result.stdout + result.stderr
    rid = run_id_of(result)
    assert "FAILED" in result.stdout
    assert "error: ValueError: cannot handle 7" in result.stdout
    assert "failed step: explode-1\n" in result.stdout
    assert f"keel retry {rid}" in result.stdout
    shown = keel_cli("runs", "show", rid)
    assert shown.returncode == 0, shown.stderr
    assert "explode-1  FAILED" in shown.stdout
    assert "square-0  SUCCEEDED" in shown.stdout
    assert "traceback of step explode-1" in shown.stdout
    assert 'raise ValueError(f"cannot handle {x}")' in shown.stdout
    assert "cli_flows.py" in shown.stdout


def test_failure_in_a_child_run_names_the_child_step() -> None:
    result = keel_cli("run", flow("failing_child"))
    assert result.returncode == 1, result.stdout + result.stderr
    rid = run_id_of(result)
    assert f"failed step: explode-1 of child run {rid}.0" in result.stdout
    assert "cannot handle 3" in result.stdout
    shown = cli("runs", "show", rid)
    assert "explode-1  FAILED" in shown.stdout
    assert "traceback of step explode-1" in shown.stdout


def test_unserializable_output_names_the_step_and_type() -> None:
    result = keel_cli("run", flow("unserializable"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SerializationError" in result.stdout
    assert "make_lock-0" in result.stdout and "_thread.lock" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# -- reading runs ------------------------------------------------------------------------------
def test_runs_ls_newest_first_with_filters() -> None:
    first = run_id_of(keel_cli("run", flow("greet")))
    second = run_id_of(keel_cli("run", flow("failing")))
    listed = cli("runs", "ls")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.index(second) < listed.stdout.index(first)
    assert "ID" in listed.stdout and "STATUS" in listed.stdout
    failed = cli("runs", "ls", "--status", "failed")
    assert second in failed.stdout and first not in failed.stdout
    by_name = cli("runs", "ls", "--workflow", "greet")
    assert first in by_name.stdout and second not in by_name.stdout
    limited = cli("runs", "ls", "--limit", "1")
    assert second in limited.stdout and first not in limited.stdout
    assert "--all" in limited.stderr
    assert first in cli("runs", "ls", "--all").stdout
    assert_clean_error(cli("runs", "ls", "--status", "sideways"), 2, "SIDEWAYS")


def test_runs_ls_on_an_empty_store() -> None:
    result = cli("runs", "ls")
    assert result.returncode == 0
    assert "no runs" in result.stdout


def test_runs_show_nests_child_runs() -> None:
    rid = run_id_of(keel_cli("run", flow("parent")))
    shown = cli("runs", "show", rid)
    assert shown.returncode == 0, shown.stderr
    assert f"child run {rid}.0" in shown.stdout
    assert "total-3  SUCCEEDED" in shown.stdout
    child = cli("runs", "show", f"{rid}.0")
    assert f"parent    {rid}" in child.stdout


def test_runs_show_groups_a_large_run_and_all_lists_it() -> None:
    rid = run_id_of(keel_cli("run", flow("sum_squares"), "-p", "n=300"))
    shown = cli("runs", "show", rid)
    assert shown.returncode == 0, shown.stderr
    assert "square  300 steps: 300 succeeded" in shown.stdout
    assert "… 297 more (--all lists every step)" in shown.stdout
    assert "square-299" not in shown.stdout
    everything = cli("runs", "show", rid, "--all")
    assert "square-299  SUCCEEDED" in everything.stdout


def test_unknown_run_id_everywhere() -> None:
    for args in (
        ("runs", "show", "zzzz"),
        ("resume", "zzzz"),
        ("retry", "zzzz"),
        ("cancel", "zzzz"),
        ("logs", "zzzz"),
        ("artifacts", "ls", "zzzz"),
        ("cache", "explain", "zzzz", "step"),
    ):
        assert_clean_error(cli(*args), 2, "no run with id 'zzzz'")


def test_logs_show_what_steps_printed_and_logged() -> None:
    rid = run_id_of(keel_cli("run", flow("greet"), "-p", "times=2"))
    everything = cli("logs", rid)
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.count("shouting hello") == 2
    assert "WARNING cli-flows: about to shout hello" in everything.stdout
    one = cli("logs", rid, "shout-1", "--attempt", "1")
    assert one.returncode == 0, one.stderr
    assert "shout-1 · attempt 1" in one.stdout
    assert "shout-0" not in one.stdout
    assert_clean_error(cli("logs", rid, "shout-1", "--attempt", "2"), 2, "made 1 attempt")
    assert_clean_error(cli("logs", rid, "nosuchstep"), 2, "no step 'nosuchstep'")
    assert_clean_error(cli("logs", rid, "shout"), 2, "ran as 2 steps")


# -- artifacts ---------------------------------------------------------------------------
def test_artifacts_ls_and_get(tmp_path: Path) -> None:
    rid = run_id_of(keel_cli("run", flow("values"), "-p", "big=100000"))
    listed = cli("artifacts", "ls", rid)
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"pair-0\s+SUCCEEDED\s+tuple", listed.stdout), listed.stdout
    assert re.search(r"blob-1\s+SUCCEEDED\s+str\s+97\.7 KiB\s+json\s+\w+\s+artifact", listed.stdout)
    small = cli("artifacts", "get", rid, "pair")
    assert small.returncode == 0, small.stderr
    assert "(1, 2)" in small.stdout
    assert_clean_error(cli("artifacts", "get", rid, "blob"), 2, "too big to print", "-o")
    target = tmp_path / "blob.json"
    written = cli("artifacts", "get", rid, "blob-1", "-o", target)
    assert written.returncode == 0, written.stderr
    assert target.read_bytes() == b'"' + b"x" * 100_000 + b'"'
    squares = run_id_of(keel_cli("run", flow("sum_squares"), "-p", "n=3"))
    assert cli("artifacts", "get", squares, "total").stdout.strip() == "5"


# -- cache --------------------------------------------------------------------------------
def test_cache_explain_hit_and_miss(backend: str) -> None:
    first = run_id_of(keel_cli("run", flow("cached")))
    second = keel_cli("run", flow("cached"))
    assert "1 (1 cached)" in second.stdout
    hit = cli("cache", "explain", run_id_of(second), "slow_double")
    assert hit.returncode == 0, hit.stderr
    assert "code_hash" in hit.stdout and "input arg0" in hit.stdout
    assert f"HIT: the value was reused from {first}/slow_double-0" in hit.stdout
    other = run_id_of(keel_cli("run", flow("cached"), "-p", "x=4"))
    miss = cli("cache", "explain", other, "slow_double-0")
    assert miss.returncode == 0, miss.stderr
    assert "MISS: compared with the closest earlier step" in miss.stdout
    assert re.search(r"input arg0\s+\w+…\s+\w+…\s+different input content", miss.stdout)
    plain = run_id_of(keel_cli("run", flow("sum_squares"), "-p", "n=1"))
    assert "does not use the cache" in cli("cache", "explain", plain, "total").stdout


def test_cache_clear_keeps_recorded_outputs() -> None:
    first = run_id_of(keel_cli("run", flow("cached")))
    cleared = cli("cache", "clear", "--task", "slow_double")
    assert cleared.returncode == 0, cleared.stderr
    assert "dropped 1 cache entry of task slow_double" in cleared.stdout
    again = keel_cli("run", flow("cached"))
    assert "1 (1 succeeded)" in again.stdout  # ran again: nothing left to reuse
    explained = cli("cache", "explain", run_id_of(again), "slow_double")
    assert f"MISS although run {first} step slow_double-0 has the same key" in explained.stdout
    assert cli("artifacts", "get", first, "slow_double").stdout.strip() == "6"
    everything = cli("cache", "clear")
    assert "dropped 1 cache entry;" in everything.stdout


# -- retry, cancel, resume ----------------------------------------------------------------
RETRY_FLOW = """
from pathlib import Path

import keel

LOG = Path(__file__).with_suffix(".log")


@keel.task
def prepare(n: int) -> list[int]:
    with LOG.open("a") as f:
        f.write("prepare\\n")
    return list(range(n))


@keel.task
def finish(xs: list[int]) -> int:
    BODY


@keel.workflow
def job(n: int = 4) -> int:
    return finish(prepare(n))
"""


def test_retry_after_fixing_the_code_reuses_succeeded_steps(tmp_path: Path) -> None:
    source = tmp_path / "job.py"
    source.write_text(RETRY_FLOW.replace("BODY", "raise RuntimeError('not fixed yet')"))
    failed = keel_cli("run", f"{source}:job")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "RuntimeError: not fixed yet" in failed.stdout
    old = run_id_of(failed)
    source.write_text(RETRY_FLOW.replace("BODY", "return sum(xs)"))
    retried = keel_cli("retry", old)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    new = run_id_of(retried)
    assert new != old
    assert "result: 6" in retried.stdout
    assert f"1 reused from run {old}" in retried.stdout
    assert (tmp_path / "job.log").read_text() == "prepare\n"  # not run a second time
    shown = cli("runs", "show", new)
    assert f"retry of  {old}" in shown.stdout
    assert "prepare-0  SUCCEEDED" in shown.stdout and f"reused from {old}/prepare-0" in shown.stdout
    note = cli("logs", new, "prepare-0")
    assert f"keel logs {old} prepare-0" in note.stderr


def test_cancel_of_a_finished_run_is_refused() -> None:
    rid = run_id_of(keel_cli("run", flow("greet")))
    result = cli("cancel", rid)
    assert_clean_error(result, 1, "already finished (SUCCEEDED)")
    assert keel.Client().run(rid).status == "SUCCEEDED"


def test_ctrl_c_cancels_then_resume_finishes(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text("slow")
    ticks = tmp_path / "control.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "run", flow("ticking"), "-p", f"control={control}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + WAIT_SECONDS
    while not (ticks.exists() and len(ticks.read_text().splitlines()) >= 2):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run never started its steps"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT_SECONDS)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in out + err
    rid = run_id_of(subprocess.CompletedProcess([], 130, out, err))
    assert f"keel resume {rid}" in err
    assert keel.Client().run(rid).status == "CANCELLED"
    again = cli("cancel", rid)
    assert again.returncode == 0, again.stderr
    assert "was already CANCELLED" in again.stdout
    control.write_text("fast")
    resumed = keel_cli("resume", rid)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"run {rid}" in resumed.stdout
    assert f"result: {sum(range(300))}" in resumed.stdout
    assert "replayed from the record" in resumed.stdout
    assert keel_cli("resume", rid).stdout.startswith(f"run {rid} already succeeded")


def test_cancel_a_run_alive_in_another_process(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.write_text("slow")
    ticks = tmp_path / "control.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel", "run", flow("ticking"), "-p", f"control={control}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    deadline = time.monotonic() + WAIT_SECONDS
    while not ticks.exists():
        assert proc.poll() is None, "the run ended before it could be cancelled"
        assert time.monotonic() < deadline, "the run never started its steps"
        time.sleep(0.05)
    (run,) = keel.Client().runs()
    asked = keel_cli("cancel", run.id)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert f"asked run {run.id} (RUNNING)" in asked.stdout
    out, err = proc.communicate(timeout=WAIT_SECONDS)
    assert proc.returncode == 1, out + err
    assert "CANCELLED" in out and f"continue it with: keel resume {run.id}" in out
    assert keel.Client().run(run.id).status == "CANCELLED"


# -- broken stores --------------------------------------------------------------------------
def test_corrupt_database_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "corrupt.db"
    db.write_bytes(b"this is not a database, just garbage bytes " * 100)
    monkeypatch.setenv("KEEL_DB_URL", f"sqlite:///{db}")
    for args in (("runs", "ls"), ("run", flow("greet")), ("runs", "show", "x")):
        assert_clean_error(keel_cli(*args), 2, "cannot open the metadata store", "not a database")
    assert db.read_bytes().startswith(b"this is not a database")  # left as it was


def test_unreachable_postgres_and_bad_urls() -> None:
    unreachable = keel_cli("--db-url", "postgresql+psycopg://keel@127.0.0.1:1/keel", "runs", "ls")
    assert_clean_error(unreachable, 2, "cannot open the metadata store", "127.0.0.1")
    assert_clean_error(cli("--db-url", "not a url", "runs", "ls"), 2, "not a valid")
    assert_clean_error(cli("--db-url", "nosuchdb://x/y", "runs", "ls"), 2, "nosuchdb")


def test_db_url_option_selects_the_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'other.db'}"
    rid = run_id_of(keel_cli("--db-url", url, "run", flow("greet")))
    assert rid in cli("--db-url", url, "runs", "ls").stdout
    assert_clean_error(cli("runs", "show", rid), 2, "no run with id")
