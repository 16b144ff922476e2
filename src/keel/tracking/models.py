"""`keel.log_model`, `keel.load_model`, and the model URIs both understand.

A logged model is two artifacts of a tracked run (or step) under `NAME/`: the model
file (`model.joblib`, `model.pkl`, `model.onnx`) and `keel-model.json`, which says
its flavor, the library versions it was saved with, its signature and the hash of
the model file.

URIs:
- `models:/NAME/VERSION`, `models:/NAME/latest`, `models:/NAME@ALIAS`: registered versions;
- `runs:/RUN_ID/NAME`: a model logged on a run;
- `runs:/RUN_ID/STEP_KEY/NAME`: a model logged inside a step;
- `runs:/RUN_ID/STEP_KEY`: the output of a step (a task that returned the model).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.errors import (
    ArtifactIntegrityError,
    ModelNotFoundError,
    ModelRegistryError,
    RunNotFoundError,
    StepNotFoundError,
)
from keel.store.artifacts import artifact_store
from keel.tracking.flavors import flavor_for, get_flavor, library_versions
from keel.tracking.signature import (
    Signature,
    as_signature,
    infer_signature,
    signature_from_estimator,
)

if TYPE_CHECKING:
    from keel.store.metadata import MetadataStore

MODEL_JSON = "keel-model.json"
URI_FORMS = (
    "models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS, runs:/RUN_ID/NAME, "
    "runs:/RUN_ID/STEP_KEY/NAME (a model logged in a step) or runs:/RUN_ID/STEP_KEY "
    "(a step's output)"
)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,249}")
_REUSABLE = ("SUCCEEDED", "CACHED")


@dataclass(frozen=True)
class ModelSource:
    """A model's bytes (by hash in the artifact store) and how to load them."""

    flavor: str
    source_hash: str
    meta: dict[str, Any]
    signature: Signature | None
    run_id: str | None = None
    seq: int | None = None
    uri: str | None = None
    live: Any = field(default=None, compare=False, repr=False)  # when already loaded


def check_name(name: Any, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ModelRegistryError(
            f"{what} {name!r} is not valid",
            hint="Use 1 to 250 letters, digits, '_', '-' or '.', starting with a letter or "
            "digit (no '/', '@' or spaces)",
        )
    return name


def resolve_signature(
    model: Any, signature: Any = None, input_example: Any = None
) -> Signature | None:
    """The signature given, else inferred from the example, else what a fitted
    estimator says about its features."""
    if signature is not None:
        return as_signature(signature)
    if input_example is not None:
        return infer_signature(input_example)
    return signature_from_estimator(model)


# -- log_model ---------------------------------------------------------------------------


def log_model(
    model: Any,
    name: str = "model",
    *,
    flavor: str | None = None,
    signature: Any = None,
    input_example: Any = None,
) -> str:
    """Save `model` into the current tracked run (the step, inside a step) under
    `name/`; returns its URI: `runs:/RUN_ID/NAME` or `runs:/RUN_ID/STEP_KEY/NAME`."""
    from keel.tracking.active import current
    from keel.tracking.log import _artifact_path, _log_bytes

    if not isinstance(name, str):
        raise ModelRegistryError(f"the model's artifact name must be a string, got {name!r}")
    prefix = _artifact_path(name)
    chosen = flavor_for(model, flavor)
    sig = resolve_signature(model, signature, input_example)
    saved = chosen.save(model, sig)
    run = current()
    assert run is not None
    _log_bytes(run, f"{prefix}/{saved.file}", saved.data, "model")
    description = {
        "keel_model": 1,
        "flavor": chosen.name,
        "file": saved.file,
        "hash": hashlib.sha256(saved.data).hexdigest(),
        "size": len(saved.data),
        "meta": saved.meta,
        "signature": sig.to_dict() if sig is not None else None,
        "logged_at": time.time(),
    }
    example = _example_json(input_example)
    if example is not None:
        _log_bytes(run, f"{prefix}/input_example.json", example, "model")
        description["input_example"] = "input_example.json"
    data = json.dumps(description, indent=2, sort_keys=True).encode()
    _log_bytes(run, f"{prefix}/{MODEL_JSON}", data, "model")
    run.recorder.flush()  # the URI resolves as soon as it is returned
    if run.seq < 0:
        return f"runs:/{run.run_id}/{prefix}"
    return f"runs:/{run.run_id}/{_step_key(run.run_id, run.seq)}/{prefix}"


def _example_json(example: Any) -> bytes | None:
    """The input example as JSON (a DataFrame in pandas' 'split' form), if it has one."""
    if example is None:
        return None
    if hasattr(example, "to_json"):
        return str(example.to_json(orient="split", index=False)).encode()
    if hasattr(example, "tolist"):
        example = example.tolist()
    try:
        return json.dumps(example).encode()
    except (TypeError, ValueError):
        return None


def _step_key(run_id: str, seq: int) -> str:
    from keel.sdk.context import current_step

    step = current_step()
    if step is not None and step.run_id == run_id and step.seq == seq and step.step_key:
        return step.step_key
    return str(seq)  # runs:/RUN/SEQ/NAME resolves too


# -- resolving sources -------------------------------------------------------------------


def _bad_uri(uri: str, why: str) -> ModelRegistryError:
    return ModelRegistryError(f"cannot use the model URI {uri!r}: {why}", hint=f"Use {URI_FORMS}")


def parse_models_uri(uri: str) -> tuple[str, str]:
    """`models:/NAME/VERSION` -> (NAME, "VERSION"); `models:/NAME@ALIAS` -> (NAME, "@ALIAS")."""
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        check_name(name)
        check_name(alias, "alias")
        return name, "@" + alias
    parts = rest.split("/")
    if len(parts) != 2 or not parts[1]:
        raise _bad_uri(uri, "name a version or an alias after the model's name")
    check_name(parts[0])
    if not (parts[1].isdigit() or parts[1] == "latest"):
        raise _bad_uri(uri, f"{parts[1]!r} is not a version number (or 'latest')")
    return parts[0], parts[1]


def source_from_runs_uri(store: MetadataStore, uri: str) -> ModelSource:
    from keel.client import Client

    parts = [p for p in uri[len("runs:/") :].split("/") if p]
    if len(parts) < 2:
        raise _bad_uri(uri, "give the run id and then the model's name or a step key")
    try:
        run = Client(store=store).run(parts[0])
    except RunNotFoundError as exc:
        raise ModelNotFoundError(f"{uri}: {exc.message}", hint=exc.hint) from None
    found = logged_model(store, run.id, -1, "/".join(parts[1:]), uri)
    if found is not None:
        return found
    try:
        step = run.step(parts[1])
    except StepNotFoundError:
        step = None
    if step is not None:
        if len(parts) == 2:
            return source_from_step(store, step, uri)
        found = logged_model(store, run.id, step.seq, "/".join(parts[2:]), uri)
        if found is not None:
            return found
    known = logged_models(store, run.id)
    raise ModelNotFoundError(
        f"nothing at {uri}: no model logged under that name and no step with that key "
        f"in run {run.id}",
        hint=("Models logged in that run: " + ", ".join(known))
        if known
        else "No model was logged in that run; a step's output is runs:/RUN_ID/STEP_KEY",
    )


def logged_model(
    store: MetadataStore, run_id: str, seq: int, path: str, uri: str
) -> ModelSource | None:
    from keel.store.tracking import load_logged_artifacts

    target = f"{path.strip('/')}/{MODEL_JSON}"
    for item in load_logged_artifacts(store, run_id, seq):
        if item.path == target:
            raw = artifact_store(store.config.artifacts_url).get(item.hash)
            if hashlib.sha256(raw).hexdigest() != item.hash:
                raise ArtifactIntegrityError(
                    f"{uri}: the model's description {item.hash} was changed on disk "
                    "after it was logged, so keel will not use it",
                    run_id=run_id,
                    hint="Restore the artifact store from a backup, or log the model again",
                )
            info = json.loads(raw)
            sig = info.get("signature")
            return ModelSource(
                flavor=info["flavor"],
                source_hash=info["hash"],
                meta={**info.get("meta", {}), "file": info.get("file")},
                signature=Signature.from_dict(sig) if sig else None,
                run_id=run_id,
                seq=seq if seq >= 0 else None,
                uri=uri,
            )
    return None


def logged_models(store: MetadataStore, run_id: str) -> list[str]:
    """The runs:/ URIs of every model logged in a run and its steps."""
    import sqlalchemy as sa

    from keel.store.schema import logged_artifacts, steps

    stmt = (
        sa.select(logged_artifacts.c.seq, logged_artifacts.c.path, steps.c.key)
        .select_from(
            logged_artifacts.outerjoin(
                steps,
                sa.and_(
                    steps.c.run_id == logged_artifacts.c.run_id,
                    steps.c.seq == logged_artifacts.c.seq,
                ),
            )
        )
        .where(
            logged_artifacts.c.run_id == run_id,
            logged_artifacts.c.path.endswith("/" + MODEL_JSON),
        )
        .order_by(logged_artifacts.c.seq, logged_artifacts.c.path)
    )
    with store.engine.connect() as conn:
        rows = list(conn.execute(stmt))
    out = []
    for row in rows:
        name = row.path[: -len(MODEL_JSON) - 1]
        where = f"{row.key or row.seq}/" if row.seq >= 0 else ""
        out.append(f"runs:/{run_id}/{where}{name}")
    return out


def source_from_step(store: MetadataStore, step: Any, uri: str | None = None) -> ModelSource:
    """A step whose output is the model: the recorded bytes are reused as they are."""
    if step.status not in _REUSABLE or not step.has_output():
        raise ModelRegistryError(
            f"step {step.key} has no output to register (status {step.status})",
            run_id=step.run_id,
            hint="Register the step of a task that returned the fitted model",
        )
    model = step.output()
    chosen = flavor_for(model) if _is_model(model) else None
    if chosen is None:
        raise ModelRegistryError(
            f"the output of step {step.key} is a {type(model).__name__}, not a model",
            run_id=step.run_id,
            hint="Register the step of a task that returned the fitted model (a scikit-learn "
            "estimator, an onnx.ModelProto, or an object with a predict method)",
        )
    digest = step.output_hash
    if step.output_ref is None:  # kept inline in the step's row: copy it next to the others
        artifact_store(store.config.artifacts_url).put(digest, step.output_bytes())
    meta = {
        "format": "step-output",
        "serializer": step.serializer,
        "class": step.output_type,
        **library_versions(chosen.name),
    }
    return ModelSource(
        flavor=chosen.name,
        source_hash=digest,
        meta=meta,
        signature=signature_from_estimator(model),
        run_id=step.run_id,
        seq=step.seq,
        uri=uri or f"runs:/{step.run_id}/{step.key}",
        live=model,
    )


def _is_model(value: Any) -> bool:
    try:
        flavor_for(value)
    except ModelRegistryError:
        return False
    return True


# -- loading -----------------------------------------------------------------------------

_CHECKED = (
    "predict",
    "predict_proba",
    "predict_log_proba",
    "decision_function",
    "transform",
    "score_samples",
)


class LoadedModel:
    """A loaded model: `.predict(data)` checks `data` against the signature first.

    Every other attribute is the live model's (`.predict_proba`, `.classes_`, ...);
    `unwrap()` returns the live model itself.
    """

    def __init__(
        self,
        raw: Any,
        *,
        flavor: str,
        signature: Signature | None,
        uri: str,
        meta: Mapping[str, Any],
    ) -> None:
        self._raw = raw
        self.flavor = flavor
        self.signature = signature
        self.uri = uri
        self.meta = dict(meta)

    def __repr__(self) -> str:
        return f"<keel model {self.uri} ({self.flavor}): {type(self._raw).__name__}>"

    def unwrap(self) -> Any:
        return self._raw

    def check_input(self, data: Any) -> Any:
        """`data` as the model gets it, or a SignatureError naming what does not match."""
        return data if self.signature is None else self.signature.check(data)

    def predict(self, data: Any, *args: Any, **kwargs: Any) -> Any:
        method = getattr(self._raw, "predict", None)
        if method is None:
            method = self._raw  # a plain function saved with the pyfunc flavor
        return method(self.check_input(data), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        raw = self.__dict__.get("_raw")
        if raw is None or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(raw, name)
        if name in _CHECKED and callable(value):

            def checked(data: Any, *args: Any, **kwargs: Any) -> Any:
                return value(self.check_input(data), *args, **kwargs)

            return checked
        return value


def load_source(store: MetadataStore, source: ModelSource, uri: str) -> LoadedModel:
    if source.flavor == "mlflow":
        from keel.tracking.mlflow_models import load_mlflow_model

        raw = load_mlflow_model(store, source.meta, source.run_id, source.seq)
    elif source.live is not None and source.flavor != "onnx":
        raw = source.live
    else:
        from keel.tracking.pins import model_bytes

        flavor = get_flavor(source.flavor)
        raw = flavor.load(model_bytes(store, source), source.meta)
    return LoadedModel(
        raw, flavor=source.flavor, signature=source.signature, uri=uri, meta=source.meta
    )


# Serves `load_model` from a cache when set: a serving process installs one
# (keel/serving/model_cache.py) so a task that loads its model on every request does
# not read and unpickle it each time. It gets the URI and the uncached loader.
LoadHook = Callable[[str, Callable[[str], "LoadedModel"]], "LoadedModel"]
_load_hook: LoadHook | None = None


def set_load_hook(hook: LoadHook | None) -> LoadHook | None:
    """Install (or, with None, remove) the process-wide `load_model` hook; returns
    the previous one."""
    global _load_hook
    previous, _load_hook = _load_hook, hook
    return previous


def load_model(model_uri: Any) -> LoadedModel:
    """The live model behind `models:/NAME/VERSION`, `models:/NAME@ALIAS`,
    `models:/NAME/latest`, `runs:/RUN_ID/[STEP_KEY/]NAME` or `runs:/RUN_ID/STEP_KEY`."""
    from keel.tracking import registry

    if isinstance(model_uri, registry.ModelVersion):
        model_uri = model_uri.uri
    if not isinstance(model_uri, str):
        raise ModelRegistryError(
            f"load_model takes a model URI string, got {type(model_uri).__name__}",
            hint=f"Use {URI_FORMS}",
        )
    uri = model_uri.strip()
    hook = _load_hook
    if hook is not None:
        return hook(uri, load_uncached)
    return load_uncached(uri)


def load_uncached(uri: str) -> LoadedModel:
    """`load_model` without the serving cache: reads and loads the model now."""
    from keel.tracking import registry

    store = registry.registry_store()
    if uri.startswith("models:/"):
        source = registry.version_source(store, *parse_models_uri(uri))
    elif uri.startswith("runs:/"):
        source = source_from_runs_uri(store, uri)
    else:
        raise _bad_uri(uri, "it starts with neither models:/ nor runs:/")
    return load_source(store, source, uri)
