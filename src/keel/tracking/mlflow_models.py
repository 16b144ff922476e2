"""Model versions across keel and MLflow, both ways.

keel loading MLflow's: a version registered through the MLflow API (flavor
"mlflow") is an MLflow model directory (an `MLmodel` file and what its flavors
saved) that the `mlflow` client uploaded to keel's artifact store: the files of a
logged model, or a folder of a run's artifacts. They are written once into a local
directory private to the process and loaded with MLflow's own loader: the native
scikit-learn object when the model has that flavor (as keel's own sklearn flavor
returns), else MLflow's pyfunc model. A version registered since keel pins versions
loads its pinned copies of those files (keel.tracking.pins), checked by sha256.

MLflow loading keel's: the server presents a version keel registered as an MLflow
model directory (`mlflow_model_files`): an `MLmodel` whose python_function flavor
names this module as its loader, the saved model and a JSON of how keel loads it.
`mlflow.pyfunc.load_model` then calls `_load_pyfunc` here, in the client's process
(which needs keel installed); the server itself never loads a model.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from keel.errors import ArtifactIntegrityError, ModelRegistryError
from keel.store.artifacts import artifact_store
from keel.store.metadata import MetadataStore
from keel.store.schema import logged_artifacts, logged_model_files
from keel.tracking.flavors import get_flavor, need_module

# "runs:/RUN/path" or "mlflow-artifacts:/EXP/RUN/artifacts/path": the folder's path.
_RUN_FOLDER = re.compile(r"^(?:runs:/[^/]+/|mlflow-artifacts:/[^/]+/[^/]+/artifacts/)(.+)$")


def load_mlflow_model(
    store: MetadataStore, meta: dict[str, Any], run_id: str | None, seq: int | None
) -> Any:
    """The live model of a version whose `meta` names its MLflow source."""
    from keel.tracking.pins import pinned_files

    source = str(meta.get("mlflow_source") or "")
    pinned = pinned_files(meta)
    files = pinned if pinned is not None else _model_files(store, meta, source, run_id, seq)
    if "MLmodel" not in files:
        raise ModelRegistryError(
            f"the MLflow model at {source!r} has no MLmodel file in keel's artifact store",
            hint="Log the model with mlflow.<flavor>.log_model against this keel server, "
            "then register it again",
        )
    models = need_module("mlflow.models", "mlflow-skinny", "loading a model logged with MLflow")
    folder = str(_materialize(store, files, pinned=pinned is not None))
    flavor = "sklearn" if "sklearn" in models.Model.load(folder).flavors else "pyfunc"
    loader = need_module(f"mlflow.{flavor}", "mlflow-skinny", f"an MLflow {flavor} model")
    return loader.load_model(folder)


def keel_held_files(
    store: MetadataStore, meta: dict[str, Any], run_id: str | None, seq: int | None
) -> dict[str, str] | None:
    """Relative path -> artifact hash of the files of an MLflow model directory that keel
    holds (a logged model's, or a folder of a run's artifacts); None if it is elsewhere."""
    source = str(meta.get("mlflow_source") or "")
    if not meta.get("mlflow_model_id") and (_RUN_FOLDER.match(source) is None or run_id is None):
        return None
    return _model_files(store, meta, source, run_id, seq)


def _model_files(
    store: MetadataStore, meta: dict[str, Any], source: str, run_id: str | None, seq: int | None
) -> dict[str, str]:
    """Relative path -> artifact hash of the model directory's files."""
    with store.engine.connect() as conn:
        if meta.get("mlflow_model_id"):
            rows = conn.execute(
                sa.select(logged_model_files.c.path, logged_model_files.c.hash).where(
                    logged_model_files.c.model_id == meta["mlflow_model_id"]
                )
            ).all()
            return {path: digest for path, digest in rows}
        match = _RUN_FOLDER.match(source)
        if match is None or run_id is None:
            raise ModelRegistryError(
                f"keel cannot find the files of the MLflow model at {source!r}",
                hint="Register a model logged to this keel server (runs:/RUN_ID/PATH "
                "or models:/MODEL_ID)",
            )
        folder = match.group(1).strip("/")
        rows = conn.execute(
            sa.select(logged_artifacts.c.path, logged_artifacts.c.hash).where(
                logged_artifacts.c.run_id == run_id,
                logged_artifacts.c.seq == (-1 if seq is None else seq),
                logged_artifacts.c.path.startswith(folder + "/", autoescape=True),
            )
        ).all()
    return {path[len(folder) + 1 :]: digest for path, digest in rows}


_folders: dict[str, Path] = {}
_folders_lock = threading.Lock()


def _materialize(store: MetadataStore, files: dict[str, str], *, pinned: bool) -> Path:
    """A local directory holding `files`, written once per distinct set of contents in
    this process. It is private to the process (mkdtemp: mode 0700, a fresh name), so
    nobody else can put files there for it to load, and it is removed at exit; it
    lives until then because a pyfunc model may read its files when it predicts.
    Pinned files are checked against their sha256 as they are read."""
    key = hashlib.sha256(repr((pinned, sorted(files.items()))).encode()).hexdigest()
    with _folders_lock:
        folder = _folders.get(key)
        if folder is not None:
            return folder
        folder = Path(tempfile.mkdtemp(prefix="keel-mlflow-model-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        artifacts = artifact_store(store.config.artifacts_url)
        root = folder.resolve()
        for rel, digest in files.items():
            target = (folder / rel).resolve()
            if not target.is_relative_to(root):
                raise ModelRegistryError(f"an MLflow model file has an unsafe path: {rel!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(artifacts.get(digest, pinned=pinned))
        _folders[key] = folder
        return folder


# -- MLflow loading keel's versions ------------------------------------------------------

DATA_FOLDER = "keel"  # the python_function flavor's `data`: the model and keel_model.json
_INFO_FILE = "keel_model.json"


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file in the artifact store: a blob by digest, or a pinned copy by sha256."""

    digest: str
    pinned: bool


def mlflow_model_files(row: Any) -> dict[str, bytes | StoredFile] | None:
    """The files of an MLflow model directory for a registered version, by path:
    generated text as bytes, the rest as stored files. For a version registered
    through MLflow, its pinned files (None if it has none)."""
    from keel.tracking.pins import model_file as model_file_of
    from keel.tracking.pins import pinned_files

    meta = json.loads(row.meta) if row.meta else {}
    pinned = pinned_files(meta)
    if row.flavor == "mlflow":
        return None if pinned is None else {p: StoredFile(d, True) for p, d in pinned.items()}
    model_file = model_file_of(meta)
    stored = (
        StoredFile(pinned[model_file], True)
        if pinned is not None and model_file in pinned
        else StoredFile(str(row.source_hash), False)
    )
    info = {
        "flavor": row.flavor,
        "meta": meta,
        "file": model_file,
        "signature": json.loads(row.signature) if row.signature else None,
        "uri": f"models:/{row.name}/{row.version}",
        # The loader checks the file against it before unpickling anything.
        "sha256": stored.digest if stored.pinned else None,
    }
    python = str(meta.get("python_version") or "")
    mlmodel = {
        "flavors": {
            "python_function": {
                "loader_module": __name__,
                "data": DATA_FOLDER,
                **({"python_version": python} if python else {}),
            }
        },
        "metadata": {"keel_model": info["uri"], "keel_flavor": row.flavor},
    }
    return {
        # MLflow reads MLmodel as YAML, of which JSON is a subset.
        "MLmodel": json.dumps(mlmodel, indent=2, sort_keys=True).encode(),
        f"{DATA_FOLDER}/{_INFO_FILE}": json.dumps(info, indent=2, sort_keys=True).encode(),
        f"{DATA_FOLDER}/{model_file}": stored,
    }


def _load_pyfunc(path: str) -> Any:
    """MLflow's entry point (`loader_module`): the keel model in `path` (the `data`
    folder of a directory from mlflow_model_files), with keel's signature check."""
    from keel.tracking.models import LoadedModel
    from keel.tracking.signature import Signature

    folder = Path(path)
    info = json.loads((folder / _INFO_FILE).read_text())
    data = (folder / info["file"]).read_bytes()
    if info.get("sha256") and hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise ArtifactIntegrityError(
            f"the file of {info['uri']} in {path} is not the one that was registered",
            hint="Download the model again; if it still differs, the server's artifact "
            "store was changed",
        )
    raw = get_flavor(info["flavor"]).load(data, info["meta"])
    signature = Signature.from_dict(info["signature"]) if info.get("signature") else None
    return LoadedModel(
        raw, flavor=info["flavor"], signature=signature, uri=info["uri"], meta=info["meta"]
    )
