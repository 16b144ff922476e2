"""Issue #9, items 3, 5 (downloads) and 8: registered versions are immutable, a
finished run's files cannot be swapped over HTTP, downloads are streamed, and a
failed artifact write leaves nothing behind. On SQLite and PostgreSQL, against a
real uvicorn server (a `keel server` process where its memory is measured), with the
real `mlflow` client, a real full disk (a 1 MiB tmpfs) and real files overwritten on
disk."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
import sqlalchemy as sa

import keel
from keel.errors import ArtifactIntegrityError, ArtifactWriteError
from keel.store.artifacts import ArtifactStore, artifact_store
from keel.store.metadata import Batch, MetadataStore, open_store
from keel.store.schema import logged_model_files, model_versions
from server_support import free_port, live_server, make_app, stop, tokens, wait_until

# mlflow.pyfunc warns about its own type hints when first imported.
pytestmark = pytest.mark.filterwarnings("ignore:.*Any type hint is inferred as AnyType:UserWarning")

MIB = 1 << 20


class _Planted:
    """What an attacker writes in place of a model: unpickling it creates `marker`, so
    the marker's absence proves keel never deserialized these bytes."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _planted(marker: Path) -> bytes:
    probe = marker.with_name(marker.name + "-probe")
    pickle.loads(pickle.dumps(_Planted(str(probe)))).close()
    assert probe.exists()  # the trap works: unpickling such bytes makes the file
    return pickle.dumps(_Planted(str(marker)))


def _fitted() -> tuple[Any, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    features = rng.random((40, 3))
    return LogisticRegression().fit(features, (features[:, 0] > 0.5).astype(int)), features


def _blob_path(store: MetadataStore, digest: str, *, pinned: bool = False) -> Path:
    root = Path(store.config.artifacts_url.removeprefix("file://"))
    return root / ("pinned" if pinned else "") / digest[:2] / digest


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _experiment(url: str, run_id: str, token: str) -> str:
    reply = httpx.get(
        f"{url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, headers=_bearer(token)
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["run"]["info"]["experiment_id"])


# -- item 3: a registered version never changes --------------------------------------------------


def test_registered_version_survives_http_and_disk_overwrites_of_the_run(
    backend: str, tmp_path: Path
) -> None:
    store = open_store()
    keys = tokens(store)
    model, features = _fitted()
    expected = list(model.predict(features))
    marker = tmp_path / "planted-bytes-were-unpickled"
    planted = _planted(marker)
    with keel.start_run(experiment="pinning") as run:
        uri = keel.log_model(model, "model")
    pinned = keel.register_model("guarded", uri)  # by an admin, in process
    assert set(pinned.meta["pinned"]) == {"model.joblib"}
    legacy = keel.register_model("guarded", uri)
    with store.engine.begin() as conn:  # as a version registered before keel pinned
        meta = {k: v for k, v in legacy.meta.items() if k != "pinned"}
        conn.execute(
            model_versions.update()
            .where(model_versions.c.name == "guarded", model_versions.c.version == 2)
            .values(meta=json.dumps(meta))
        )
    assert list(keel.load_model("models:/guarded/2").predict(features)) == expected

    app = make_app(store)
    try:
        with live_server(app) as url:
            exp = _experiment(url, run.id, keys["admin"])
            base = f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run.id}/artifacts/model"
            op = _bearer(keys["operator"])
            for method in ("PUT", "DELETE"):
                refused = httpx.request(method, f"{base}/model.joblib", content=planted, headers=op)
                assert refused.status_code == 409, refused.text
                assert refused.json()["error_code"] == "RESOURCE_CONFLICT"
                assert "has finished" in refused.json()["message"]
            # an admin may still change the run's files: the version does not follow them
            by_admin = _bearer(keys["admin"])
            admin = httpx.put(f"{base}/model.joblib", content=planted, headers=by_admin)
            assert admin.status_code == 200, admin.text
            # while a run is running, an operator writes its artifacts as before
            created = httpx.post(
                f"{url}/api/2.0/mlflow/runs/create", json={"experiment_id": exp}, headers=op
            ).json()["run"]["info"]["run_id"]
            live = f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{created}/artifacts/a.txt"
            assert httpx.put(live, content=b"v1", headers=op).status_code == 200
            ended = httpx.post(
                f"{url}/api/2.0/mlflow/runs/update",
                json={"run_id": created, "status": "FINISHED"},
                headers=op,
            )
            assert ended.status_code == 200, ended.text
            assert httpx.put(live, content=b"v2", headers=op).status_code == 409
            assert httpx.get(live, headers=op).content == b"v1"
    finally:
        stop(app)

    # the filesystem attack: the run's model blob itself rewritten in place
    source = pinned.source_hash
    assert source is not None
    _blob_path(store, source).write_bytes(planted)
    loaded = keel.load_model("models:/guarded/1")
    assert list(loaded.predict(features)) == expected
    with pytest.raises(ArtifactIntegrityError, match="changed on disk"):
        keel.load_model("models:/guarded/2")  # unpinned: refused, not unpickled
    with pytest.raises(ArtifactIntegrityError, match="changed on disk"):
        keel.load_model(uri)  # the run's own model
    with pytest.raises(ArtifactIntegrityError, match="no longer holds"):
        keel.register_model("guarded", uri)  # nor registered again from the changed blob
    assert not marker.exists()

    # the pinned copy itself changed on disk: refused before anything is unpickled
    _blob_path(store, pinned.meta["pinned"]["model.joblib"], pinned=True).write_bytes(planted)
    with pytest.raises(ArtifactIntegrityError, match="changed on disk"):
        keel.load_model("models:/guarded/1")
    assert not marker.exists()
    assert [v.version for v in keel.models.list_versions("guarded")] == [1, 2]


@pytest.fixture
def mlflow_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_mlflow_logged_model_version_is_pinned(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_client: None
) -> None:
    from mlflow.exceptions import MlflowException

    store = open_store()
    keys = tokens(store)
    model, features = _fitted()
    expected = list(model.predict(features))
    marker = tmp_path / "planted-bytes-were-unpickled"
    planted = _planted(marker)
    app = make_app(store)
    try:
        with live_server(app) as url:
            monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", keys["admin"])
            mlflow.set_tracking_uri(url)
            mlflow.set_registry_uri(url)
            mlflow.set_experiment("pinning-mlflow")
            with mlflow.start_run() as run:
                # a pickle, which is what an attacker's bytes would be unpickled as
                info = mlflow.sklearn.log_model(
                    model, name="model", serialization_format="cloudpickle"
                )
            version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "mlf-guarded")
            assert version.version == "1"
            pinned = keel.models.get_version("mlf-guarded", 1).meta["pinned"]
            assert {"MLmodel", "model.pkl"} <= set(pinned)
            with store.engine.connect() as conn:
                model_blob = conn.execute(
                    sa.select(logged_model_files.c.hash).where(
                        logged_model_files.c.model_id == info.model_id,
                        logged_model_files.c.path == "model.pkl",
                    )
                ).scalar_one()

            # an operator may not change the READY logged model's files, nor the run's
            exp = run.info.experiment_id
            arts = f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp}"
            op = _bearer(keys["operator"])
            for path in (
                f"models/{info.model_id}/artifacts/model.pkl",
                f"{run.info.run_id}/artifacts/model.pkl",
            ):
                refused = httpx.put(f"{arts}/{path}", content=planted, headers=op)
                assert refused.status_code == 409, (path, refused.text)

            # the filesystem attack on the logged model's pickle
            _blob_path(store, model_blob).write_bytes(planted)
            assert list(keel.load_model("models:/mlf-guarded/1").predict(features)) == expected
            by_mlflow = mlflow.pyfunc.load_model("models:/mlf-guarded/1")
            assert list(by_mlflow.predict(features)) == expected
            assert not marker.exists()

            # the pinned pickle changed on disk: neither keel nor the server hands it out
            _blob_path(store, pinned["model.pkl"], pinned=True).write_bytes(planted)
            # (this process keeps its checked private copy; a new one checks the pin)
            assert list(keel.load_model("models:/mlf-guarded/1").predict(features)) == expected
            fresh = subprocess.run(
                [sys.executable, "-c", "import keel; keel.load_model('models:/mlf-guarded/1')"],
                capture_output=True,
                text=True,
                env=os.environ.copy(),
                check=False,
                timeout=300,
            )
            assert fresh.returncode != 0
            assert "ArtifactIntegrityError" in fresh.stderr and "changed on disk" in fresh.stderr
            download = httpx.get(
                f"{url}/api/2.0/mlflow-artifacts/artifacts/keel-models/mlf-guarded/1/model.pkl",
                headers=op,
            )
            assert download.status_code == 409, download.text
            assert "changed on disk" in download.json()["message"]
            with pytest.raises(MlflowException):
                mlflow.pyfunc.load_model("models:/mlf-guarded/1")
            assert not marker.exists()
    finally:
        stop(app)


# -- item 5: downloads are streamed -----------------------------------------------------------


def _vm(pid: int, field: str) -> int:
    """A memory figure of a process from /proc, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _fetch(url: str, found: dict[str, tuple[int, str]]) -> None:
    hasher, size = hashlib.sha256(), 0
    with httpx.stream("GET", url, timeout=300) as reply:
        assert reply.status_code == 200, reply.read()
        for chunk in reply.iter_bytes():
            hasher.update(chunk)
            size += len(chunk)
    found[url] = (size, hasher.hexdigest())


def test_large_downloads_are_streamed(backend: str, tmp_path: Path) -> None:
    store = open_store()
    with keel.start_run(experiment="big-files") as run:
        keel.log_text("warm", "small.txt")
    block = os.urandom(MIB)
    digest, size = artifact_store(store.config.artifacts_url).put_stream(block for _ in range(256))
    assert size == 256 * MIB
    batch = Batch()
    batch.logged_artifacts = [(run.id, -1, "big.bin", digest, size, "file", time.time())]
    store.write_batch(batch)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keel", "server", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=os.environ.copy(),
        )
    try:

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, "keel server to start", 60)
        exp = _experiment(url, run.id, "")
        small = f"{url}/api/v1/runs/{run.id}/artifacts/content?path=small.txt"
        assert httpx.get(small).content == b"warm"  # the download path, warmed up
        before = _vm(proc.pid, "VmHWM")
        urls = [
            f"{url}/api/v1/runs/{run.id}/artifacts/content?path=big.bin",
            f"{url}/api/v1/artifacts/{digest}/content",
            f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp}/{run.id}/artifacts/big.bin",
        ]
        found: dict[str, tuple[int, str]] = {}
        threads = [threading.Thread(target=_fetch, args=(u, found)) for u in urls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        peak = _vm(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert found == {u: (size, digest) for u in urls}
    # 768 MiB went out at once; the server's peak resident memory grew by far less
    assert peak - before < 64 * MIB, f"server peak RSS grew by {(peak - before) / MIB:.0f} MiB"


# -- item 8: a failed write leaves nothing behind ------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), so writes fail with a real ENOSPC."""
    folder = tmp_path / "full"
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:  # a skip, which CI turns into a failure
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".tmp-*"))


@keel.task
def _prepare(n: int) -> int:
    return n + 1


@keel.task
def _too_big(seed: int) -> bytes:
    return bytes([seed % 256]) * (2 * MIB)


@keel.workflow
def _fills_the_disk() -> int:
    first = _prepare(1)
    return first + len(_too_big(first))


def test_full_disk_leaves_no_temp_files_and_points_to_resume(
    backend: str, full_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"x" * (2 * MIB)
    with pytest.raises(ArtifactWriteError) as err:
        ArtifactStore(str(full_disk)).put(hashlib.sha256(data).hexdigest(), data)
    assert "No space left on device" in err.value.message
    assert "keel resume" in err.value.message
    with pytest.raises(ArtifactWriteError):
        ArtifactStore(str(full_disk)).put_stream(iter([data]))
    assert _leftovers(full_disk) == []

    monkeypatch.setenv("KEEL_ARTIFACTS", str(full_disk))
    handle = keel.run(_fills_the_disk)
    assert handle.status == "FAILED"
    steps = {s.task.rsplit(".", 1)[-1]: s for s in keel.Client().run(handle.id).steps}
    failed = steps["_too_big"]
    assert failed.status == "FAILED"
    assert failed.error_type is not None and failed.error_type.endswith("ArtifactWriteError")
    assert failed.error_message is not None
    assert "No space left on device" in failed.error_message
    assert "keel resume" in failed.error_message
    assert _leftovers(full_disk) == []

    # the environment fixed, the run continues where it stopped
    subprocess.run(["mount", "-o", "remount,size=16m", str(full_disk)], check=True)
    resumed = keel.resume(handle.id)
    assert resumed.status == "SUCCEEDED" and resumed.result() == 2 + 2 * MIB
    after = {s.task.rsplit(".", 1)[-1]: s for s in keel.Client().run(handle.id).steps}
    assert len(after["_prepare"].attempts) == 1  # recorded before the fault, not run again
    assert _leftovers(full_disk) == []
