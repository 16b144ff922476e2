"""The Ray executor on a real multi-node Ray cluster on this machine.

One cluster for the module (`ray.cluster_utils.Cluster`, every node on 127.0.0.1): a
head node (custom resource `head`) and a `stable` node (`stable` and `pool`); the
node-death test adds a `victim` node (`victim` and `pool`) and kills it mid-run.
Each node has 2 logical CPUs, so that Ray keeps its idle workers between runs. The test
process connects with `ray.init(address=...)` and keel reuses that connection.

Covered: same results as on threads (and the demo pipeline); resource requests and
runtime_env; a large numpy array between steps by reference (read-only zero-copy
views on the workers, no growth of the coordinator's memory, the artifact recorded);
logs per attempt; a worker killed inside a step, retried; a node killed mid-run, with
every recorded step run once; the coordinator SIGKILLed and the run resumed on Ray;
cancellation; timeouts; connecting by address and starting Ray on demand.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

# Nodes started by this process announce 127.0.0.1: Ray reads this when first imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

import keel  # noqa: E402
from flows import ray_flows as flows  # noqa: E402

MB = 1024 * 1024
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    # Ray workers import step functions by module name (`flows.ray_flows`).
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved) if p)
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"head": 4},
            "object_store_memory": 500 * MB,
            "include_dashboard": False,
        },
    )
    stable = c.add_node(
        num_cpus=2, resources={"stable": 2, "pool": 2}, object_store_memory=500 * MB
    )
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    try:
        yield SimpleNamespace(cluster=c, head=c.head_node, stable=stable)
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture
def on_ray(cluster: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    monkeypatch.setenv("KEEL_EXECUTOR", "ray")
    return cluster


def _outputs(run_id: str, skip: str = "") -> list[tuple[str, str, Any]]:
    run = keel.Client().run(run_id)
    return [
        (s.key, s.status, s.output() if s.has_output() else None)
        for s in run.steps
        if s.key != skip
    ]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- same results as on threads -------------------------------------------------------------


def test_same_results_as_threads(
    backend: str, cluster: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keel.executors import ray_executor

    results: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for name in ("threads", "ray"):
        monkeypatch.setenv("KEEL_EXECUTOR", name)
        handle = keel.run(flows.mixed, n=4)
        assert handle.status == "SUCCEEDED"
        result = handle.result()
        talk = result.pop("talk")
        assert talk["attempt"] == 1
        if name == "ray":
            assert talk["pid"] != os.getpid()
        else:
            assert talk["pid"] == os.getpid()
        logs = keel.Client().run(handle.id).step(talk["key"]).logs()
        assert f"printed by {talk['key']}: hello" in logs
        assert "to stderr" in logs
        assert f"logged by {talk['key']}" in logs
        results[name] = result
        outputs[name] = _outputs(handle.id, skip=talk["key"])

    assert results["ray"] == results["threads"]
    assert results["ray"] == {
        "summary": {
            "label": "squares",
            "sum": 14,
            "extra": {"n": 4, "nested": [1, [2, 3]]},
            "pairs": [(0, 0), (1, -1), (4, -4), (9, -9)],
        },
        "nested": {"label": "ends", "sum": 9, "extra": {"last": 9}, "pairs": [(0, 0), (9, -9)]},
        "caught": "ValueError: bad 4",
        "last": 81,
    }
    assert outputs["ray"] == outputs["threads"]
    assert not ray_executor.started_by_keel()  # it used the test's connection


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    # Loaded from its file, not importable by name: its tasks travel to the Ray
    # workers by value, as those of a script run with `python file.py` do.
    spec = importlib.util.spec_from_file_location("keel_demo_on_ray", ROOT / "examples/digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_pipeline_gives_the_same_result_on_ray(
    cluster: SimpleNamespace, demo: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    local = keel.run(demo.digits, n_folds=2)
    assert local.status == "SUCCEEDED"
    # A fresh store, so that nothing comes from the cache of the local run.
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "ray-home"))
    monkeypatch.setenv("KEEL_EXECUTOR", "ray")
    on_ray = keel.run(demo.digits, n_folds=2)
    assert on_ray.status == "SUCCEEDED"
    assert on_ray.result() == local.result()
    steps = keel.Client().run(on_ray.id).steps
    assert len(steps) >= 16
    assert {s.status for s in steps} == {"SUCCEEDED"}
    assert "test accuracy" in keel.Client().run(on_ray.id).step("score_test").logs()


# -- placement ---------------------------------------------------------------------------------


def test_resources_place_steps_on_the_nodes_that_have_them(
    backend: str, on_ray: SimpleNamespace
) -> None:
    result = keel.run(flows.placement).result()
    assert set(result["stable"]) == {on_ray.stable.node_id}
    assert set(result["head"]) == {on_ray.head.node_id}
    assert result["env"] == "from runtime_env"


def test_a_ray_steps_output_is_recorded_while_it_runs(
    backend: str, on_ray: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_LIVE_LOG_INTERVAL", "0.1")
    handle = keel.run(flows.live_logs)
    assert handle.status == "SUCCEEDED"
    assert handle.result() is True, "the first line was not in the store while the step ran"
    text = keel.Client().run(handle.id).step("ray_live_talker-0").logs()
    assert text.count("first line from ray") == 1 and text.count("second line from ray") == 1
    assert text.index("first line from ray") < text.index("second line from ray")


def test_unknown_executor_option_is_a_clear_error(on_ray: SimpleNamespace) -> None:
    handle = keel.run(flows.bad_options)
    assert handle.status == "FAILED"
    step = keel.Client().run(handle.id).steps[0]
    assert step.status == "FAILED"
    assert step.error_type is not None and step.error_type.endswith("ConfigError")
    assert step.error_message is not None
    assert "'no_such_option'" in step.error_message
    assert "runtime_env" in step.error_message  # says what is understood


# -- values by reference -------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(300)
def test_large_array_moves_between_steps_without_the_coordinator(
    on_ray: SimpleNamespace, keel_home: Path
) -> None:
    mb = 160
    n = mb * MB // 8
    baseline = _rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        handle = keel.run(flows.big, mb=mb)
    finally:
        stop.set()
        sampler.join()
    assert handle.status == "SUCCEEDED"
    result = handle.result()

    # The body saw the executor's reference, and the workers got Ray's zero-copy,
    # read-only views (an array read from the artifact store would be writeable).
    assert result["handle"] == "ObjectRef"
    expected = n * (n - 1) / 2
    assert result["used"] == {
        "sum": expected,
        "nbytes": mb * MB,
        "writeable": False,
        "node": on_ray.head.node_id,
    }
    assert result["used_again"]["sum"] == expected + n
    assert result["used_again"]["writeable"] is False
    # The coordinator never held the array (nor its copies).
    assert peak - baseline < mb * MB // 2, f"coordinator grew by {(peak - baseline) / MB:.0f} MB"

    # Each array was still recorded durably, by the worker that made it.
    run = keel.Client().run(handle.id)
    made = next(s for s in run.steps if s.task == "ray_big_make")
    assert made.output_size is not None and made.output_size >= mb * MB
    assert made.output_ref is not None
    artifacts = [p for p in keel_home.rglob("*") if p.is_file() and p.stat().st_size >= mb * MB]
    assert len(artifacts) == 2  # the array and the array + 1
    assert float(made.output()[-1]) == n - 1


# -- failures --------------------------------------------------------------------------------


def test_worker_killed_inside_a_step_is_retried(
    backend: str, on_ray: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    handle = keel.run(flows.worker_dies, out=str(out))
    assert handle.result() == "survived on attempt 2"
    step = keel.Client().run(handle.id).steps[0]
    assert [a.status for a in step.attempts] == ["FAILED", "SUCCEEDED"]
    first = step.attempts[0]
    assert first.error_type is not None and first.error_type.endswith("RayTaskLostError")
    assert first.error_message is not None and "WorkerCrashedError" in first.error_message
    assert _lines(out) == [f"{step.key} 1", f"{step.key} 2"]


@pytest.mark.timeout(300)
def test_node_killed_mid_run(on_ray: SimpleNamespace, tmp_path: Path) -> None:
    c = on_ray.cluster
    victim = c.add_node(
        num_cpus=2, resources={"victim": 2, "pool": 2}, object_store_memory=100 * MB
    )
    c.wait_for_nodes()
    out = tmp_path / "effects.txt"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["handle"] = keel.run(
                flows.node_dies,
                out=str(out),
                n_slow=3,
                seconds=120.0,
                release_node=on_ray.stable.node_id,
            )
        except BaseException as exc:
            box["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 120
    while not any(
        line.startswith("ray_slow") and line.endswith(victim.node_id) for line in _lines(out)
    ):
        assert runner.is_alive() and time.monotonic() < deadline, _lines(out)
        time.sleep(0.02)
    c.remove_node(victim, allow_graceful=False)  # its raylet and workers are killed
    # Only the steps on `stable` end on the release (those retried there too): a victim
    # worker still dying cannot see it and finish.
    Path(f"{out}.release").touch()
    runner.join(timeout=180)
    assert not runner.is_alive()
    assert "error" not in box, box.get("error")
    handle = box["handle"]
    assert handle.status == "SUCCEEDED"
    result = handle.result()
    assert result["chunks"] == float(64 * 1024)  # 0 * 64 Ki + 1 * 64 Ki
    assert result["slows"] == [0, 1, 2]
    assert set(result["chunk_nodes"]) == {victim.node_id}
    assert set(result["slow_nodes"]) == {on_ray.stable.node_id}

    executions = Counter(" ".join(line.split()[:2]) for line in _lines(out))
    assert all(count == 1 for count in executions.values()), executions  # no attempt ran twice
    steps = keel.Client().run(handle.id).steps
    lost = 0
    for step in steps:
        assert step.status == "SUCCEEDED"
        attempts = step.attempts
        assert executions[f"{step.key} {attempts[-1].number}"] == 1
        if len(attempts) == 1:
            assert sum(1 for e in executions if e.startswith(f"{step.key} ")) == 1
        for attempt in attempts[:-1]:
            assert attempt.error_type is not None
            assert attempt.error_type.endswith("RayTaskLostError")
            lost += 1
    assert lost >= 1  # the steps that ran on the victim were lost and retried
    # The reduce read the chunks the dead node held from the artifact store, without
    # failing an attempt.
    reduce = next(s for s in steps if s.task == "ray_total")
    assert len(reduce.attempts) == 1


def test_cancel_drops_queued_ray_tasks_and_interrupts_running_ones(
    on_ray: SimpleNamespace, tmp_path: Path
) -> None:
    out = tmp_path / "effects.txt"
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["handle"] = keel.run(flows.hogs, n=4, out=str(out), seconds=30.0)
        except BaseException as exc:
            box["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 60
    while not _lines(out):  # the first step runs; the three others wait for the node
        assert runner.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    (running,) = keel.Client().runs(workflow="ray_hogs")
    keel.cancel(running.id)
    runner.join(timeout=60)  # well before the running step's 30 s are over
    assert not runner.is_alive()
    run = keel.Client().run(running.id)
    assert run.status == "CANCELLED"
    assert len(_lines(out)) == 1  # the queued steps never started
    assert not any(s.status == "SUCCEEDED" for s in run.steps)

    # Everything is still there to resume (and this time the steps end at once).
    Path(f"{out}.release").touch()
    handle = keel.resume(run.id)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == [0, 1, 2, 3]


@pytest.mark.timeout(300)
def test_coordinator_killed_then_resumed_on_ray(
    cluster: SimpleNamespace, keel_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "effects.txt"
    gate = tmp_path / "gate"  # the second half of the steps wait for it: killed mid-way
    n = 40
    script = (
        "import keel\n"
        "from flows import ray_flows as flows\n"
        f"keel.run(flows.crash, n={n}, out={str(out)!r}, delay=0.2, gate={str(gate)!r})\n"
    )
    env = {
        **os.environ,
        "KEEL_HOME": str(keel_home),
        "KEEL_EXECUTOR": "ray",
        "KEEL_RAY_ADDRESS": cluster.cluster.address,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(_lines(out)) < n // 3:
            assert proc.poll() is None and time.monotonic() < deadline, _lines(out)
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        gate.touch()

    (run,) = keel.Client().runs(workflow="ray_crash")
    recorded = {s.key for s in run.steps if s.status == "SUCCEEDED"}
    assert 0 < len(recorded) < n
    monkeypatch.setenv("KEEL_EXECUTOR", "ray")
    handle = keel.resume(run.id)
    assert handle.status == "SUCCEEDED"
    assert handle.result() == sum(i * i for i in range(n))
    runs_of = Counter(_lines(out))
    assert set(runs_of) == {f"ray_crash_step-{i}" for i in range(n)}
    assert all(runs_of[key] == 1 for key in recorded)  # recorded steps never ran again


@pytest.mark.timeout(120)
def test_timeouts_stop_the_step(on_ray: SimpleNamespace) -> None:
    handle = keel.run(flows.timeouts, which="sleepy", seconds=60)
    assert handle.status == "FAILED"
    step = keel.Client().run(handle.id).steps[0]
    assert step.error_type is not None and step.error_type.endswith("StepTimeoutError")
    assert "the step was stopped" in (step.attempts[0].error_message or "")

    # A step that swallows the stop signal has its worker killed a little later.
    handle = keel.run(flows.timeouts, which="stubborn", seconds=60)
    assert handle.status == "FAILED"
    step = keel.Client().run(handle.id).steps[0]
    assert step.error_type is not None and step.error_type.endswith("StepTimeoutError")
    assert "worker was killed" in (step.attempts[0].error_message or "")


# -- connecting ------------------------------------------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import json
    import keel
    import ray
    from flows import ray_flows as flows
    from keel.executors import ray_executor

    first = keel.run(flows.small_stable, n=3).result()
    address = ray.get_runtime_context().gcs_address
    second = keel.run(flows.small_stable, n=3).result()  # the same Ray, not a new one
    print(json.dumps({
        "results": [first, second],
        "started_by_keel": ray_executor.started_by_keel(),
        "gcs": [address, ray.get_runtime_context().gcs_address],
        "cpus": ray.cluster_resources().get("CPU"),
    }))
    """
)


def _run_script(env: dict[str, str], keel_home: Path) -> dict[str, Any]:
    import json

    full = {
        **os.environ,
        "KEEL_HOME": str(keel_home),
        "KEEL_EXECUTOR": "ray",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    for name in ("KEEL_RAY_ADDRESS", "RAY_ADDRESS"):
        if name not in env:
            full.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=full,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.timeout(300)
def test_connects_to_keel_ray_address(cluster: SimpleNamespace, keel_home: Path) -> None:
    got = _run_script({"KEEL_RAY_ADDRESS": cluster.cluster.address}, keel_home)
    on_stable = {"square_sum": 5, "node": cluster.stable.node_id}
    assert got["results"] == [on_stable, on_stable]
    assert got["started_by_keel"] is False
    assert got["gcs"] == [cluster.cluster.address] * 2


@pytest.mark.timeout(300)
def test_starts_a_local_ray_on_demand(cluster: SimpleNamespace, keel_home: Path) -> None:
    # No address: a private Ray of its own, on loopback, reused by the second run.
    # Its steps ask for the `stable` resource only when there is such a node.
    got = _run_script({"KEEL_RAY_NUM_CPUS": "1", "KEEL_RAY_TEST_LOCAL": "1"}, keel_home)
    assert got["results"][0] == got["results"][1]
    assert got["results"][0]["square_sum"] == 5
    assert got["started_by_keel"] is True
    first, second = got["gcs"]
    assert first == second != cluster.cluster.address
    assert first.startswith("127.0.0.1:")
    assert got["cpus"] == 1.0
