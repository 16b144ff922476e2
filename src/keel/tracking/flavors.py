"""Model flavors: how one kind of model becomes bytes and comes back as a live object.

- `sklearn`: scikit-learn estimators and pipelines, saved with joblib. The
  scikit-learn version is recorded; loading under another major or minor version
  warns with `VersionWarning` (pickles are not portable across those versions).
- `onnx`: an `onnx.ModelProto`, or a scikit-learn model converted with skl2onnx
  when `flavor="onnx"` is asked for; loaded as an `OnnxModel` on onnxruntime.
- `pyfunc`: any other object with a `predict` method, or a plain function, saved
  with cloudpickle; another Python minor version warns on load.

Without a flavor the first that accepts the model wins: onnx, sklearn, pyfunc.
`register_flavor` adds one (tried first).
"""

from __future__ import annotations

import functools
import importlib
import io
import pickle
import platform
import sys
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from keel.errors import ModelRegistryError
from keel.tracking.signature import Signature, signature_from_estimator


class VersionWarning(UserWarning):
    """The model was saved under another major or minor version of its library."""


@dataclass(frozen=True, slots=True)
class Saved:
    """A model as bytes: the file name it is logged under and what loading needs."""

    data: bytes
    file: str
    meta: dict[str, Any] = field(default_factory=dict)


class Flavor(Protocol):
    name: str

    def accepts(self, model: Any) -> bool: ...

    def save(self, model: Any, signature: Signature | None) -> Saved: ...

    def load(self, data: bytes, meta: Mapping[str, Any]) -> Any: ...


def _qualified(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _python() -> str:
    return platform.python_version()


def deserialize(data: bytes, meta: Mapping[str, Any]) -> Any:
    """Bytes back to an object, by the `format` the flavor recorded."""
    fmt = meta.get("format")
    if fmt == "joblib":
        import joblib  # type: ignore[import-untyped]

        return joblib.load(io.BytesIO(data))
    if fmt in ("pickle", "cloudpickle"):
        return pickle.loads(data)
    if fmt == "step-output":
        from keel.store.serializers import decode

        return decode(str(meta.get("serializer")), data)
    raise ModelRegistryError(
        f"this model was stored in a format keel does not know: {fmt!r}",
        hint="Was it registered by a newer keel? Upgrade keel",
    )


def check_version(library: str, saved: str | None, installed: str) -> None:
    """Warn when `saved` and `installed` differ in their major or minor number."""
    if not saved or saved.split(".")[:2] == installed.split(".")[:2]:
        return
    warnings.warn(
        f"this model was saved with {library} {saved} and is loaded with {library} "
        f"{installed}; across major or minor versions it may fail or predict differently. "
        f"Install {library}=={saved} to use it as it was, or retrain and register it "
        f"under {installed}",
        VersionWarning,
        stacklevel=4,
    )


def library_versions(flavor: str) -> dict[str, str]:
    """The versions a model of `flavor` depends on, as installed here."""
    out = {"python_version": _python()}
    if flavor == "sklearn":
        import sklearn

        out["sklearn_version"] = sklearn.__version__
    return out


def need_module(module: str, package: str, why: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelRegistryError(
            f"{why} needs the {package} package, which is not installed",
            hint=f"pip install {package}",
        ) from None


class SklearnFlavor:
    name = "sklearn"

    def accepts(self, model: Any) -> bool:
        if "sklearn" not in sys.modules or isinstance(model, type):
            return False
        from sklearn.base import BaseEstimator

        return isinstance(model, BaseEstimator)

    def save(self, model: Any, signature: Signature | None) -> Saved:
        import joblib  # type: ignore[import-untyped]
        import sklearn

        meta = {
            "sklearn_version": sklearn.__version__,
            "python_version": _python(),
            "class": _qualified(model),
        }
        buf = io.BytesIO()
        try:
            joblib.dump(model, buf)
            return Saved(buf.getvalue(), "model.joblib", {"format": "joblib", **meta})
        except (pickle.PicklingError, AttributeError, TypeError):
            # e.g. a FunctionTransformer holding a lambda: cloudpickle saves it by value.
            import cloudpickle

            data = cloudpickle.dumps(model)
            return Saved(data, "model.pkl", {"format": "cloudpickle", **meta})

    def load(self, data: bytes, meta: Mapping[str, Any]) -> Any:
        sklearn = need_module(
            "sklearn", f"scikit-learn=={meta.get('sklearn_version')}", "this model"
        )
        check_version("scikit-learn", meta.get("sklearn_version"), sklearn.__version__)
        return deserialize(data, meta)


def _is_function(model: Any) -> bool:
    return isinstance(model, types.FunctionType | types.BuiltinFunctionType | functools.partial)


class PyfuncFlavor:
    name = "pyfunc"

    def accepts(self, model: Any) -> bool:
        if isinstance(model, type):
            return False
        return callable(getattr(model, "predict", None)) or _is_function(model)

    def save(self, model: Any, signature: Signature | None) -> Saved:
        import cloudpickle

        try:
            data = cloudpickle.dumps(model)
        except Exception as exc:
            raise ModelRegistryError(
                f"cannot save the {type(model).__name__} model with cloudpickle: {exc}",
                hint="Models must be picklable (no open files, sockets or locks in them)",
            ) from None
        meta = {
            "format": "cloudpickle",
            "python_version": _python(),
            "cloudpickle_version": cloudpickle.__version__,
            "class": _qualified(model),
        }
        return Saved(data, "model.pkl", meta)

    def load(self, data: bytes, meta: Mapping[str, Any]) -> Any:
        check_version("Python", meta.get("python_version"), _python())
        return deserialize(data, meta)


_ONNX_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class OnnxModel:
    """An ONNX model on onnxruntime: `.predict(x)` is the first output, `.predict_proba`
    the second (classifiers converted by skl2onnx), `.run(feeds)` the raw session."""

    def __init__(self, data: bytes) -> None:
        ort = need_module("onnxruntime", "onnxruntime", "an ONNX model")
        self._bytes = data
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.inputs = list(self.session.get_inputs())
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __reduce__(self) -> tuple[Any, ...]:
        return (OnnxModel, (self._bytes,))

    def __repr__(self) -> str:
        shown = ", ".join(f"{i.name}{i.shape} {i.type}" for i in self.inputs)
        return f"<OnnxModel inputs: {shown}; outputs: {', '.join(self.outputs)}>"

    def run(self, feeds: Mapping[str, Any]) -> list[Any]:
        return list(self.session.run(None, dict(feeds)))

    def _outputs(self, data: Any) -> list[Any]:
        import numpy as np

        if len(self.inputs) != 1:
            raise ModelRegistryError(
                f"this ONNX model has {len(self.inputs)} inputs; predict feeds only one",
                hint="Call .run({name: array, ...}) with every input",
            )
        if hasattr(data, "to_numpy"):
            data = data.to_numpy()
        dtype = _ONNX_TYPES.get(self.inputs[0].type, "float32")
        return self.run({self.inputs[0].name: np.asarray(data).astype(dtype, copy=False)})

    def predict(self, data: Any) -> Any:
        out = self._outputs(data)[0]
        # A regressor's output is (rows, 1); scikit-learn gives (rows,).
        return out.ravel() if getattr(out, "ndim", 0) == 2 and out.shape[1] == 1 else out

    def predict_proba(self, data: Any) -> Any:
        outputs = self._outputs(data)
        if len(outputs) < 2:
            raise AttributeError("this ONNX model has a single output: use predict")
        return outputs[1]


class OnnxFlavor:
    name = "onnx"

    def accepts(self, model: Any) -> bool:
        cls = type(model)
        return cls.__name__ == "ModelProto" and cls.__module__.startswith("onnx")

    def save(self, model: Any, signature: Signature | None) -> Saved:
        onnx = need_module("onnx", "onnx", "the onnx flavor")
        meta: dict[str, Any] = {"format": "onnx", "onnx_version": onnx.__version__}
        if not self.accepts(model):
            if not SklearnFlavor().accepts(model):
                raise ModelRegistryError(
                    f"the onnx flavor takes an onnx.ModelProto or a scikit-learn model to "
                    f"convert, not a {type(model).__name__}",
                    hint="Leave flavor=None to pick one by the model's type",
                )
            model, converted = _convert_sklearn(model, signature)
            meta.update(converted)
        meta["opset"] = {op.domain or "ai.onnx": op.version for op in model.opset_import}
        return Saved(model.SerializeToString(), "model.onnx", meta)

    def load(self, data: bytes, meta: Mapping[str, Any]) -> Any:
        if meta.get("format") != "onnx":  # a step's output: a pickled ModelProto
            data = deserialize(data, meta).SerializeToString()
        return OnnxModel(data)


def _convert_sklearn(model: Any, signature: Signature | None) -> tuple[Any, dict[str, Any]]:
    skl2onnx = need_module("skl2onnx", "skl2onnx", "converting a scikit-learn model to ONNX")
    from sklearn.base import is_classifier

    sig = signature or signature_from_estimator(model)
    if sig is None:
        raise ModelRegistryError(
            "converting to ONNX needs the number of input features",
            hint="Pass input_example= (or signature=), or fit the model first",
        )
    width = len(sig.columns) if sig.columns is not None else (sig.shape or (None, None))[-1]
    if sig.columns is None and len(sig.shape or ()) != 2:
        raise ModelRegistryError(
            f"ONNX conversion takes 2-D input (rows, features); the signature is {sig}"
        )
    tensor = importlib.import_module("skl2onnx.common.data_types").FloatTensorType
    options = {"zipmap": False} if is_classifier(model) else None
    try:
        proto = skl2onnx.convert_sklearn(
            model, initial_types=[("X", tensor([None, width]))], options=options
        )
    except Exception as exc:
        raise ModelRegistryError(
            f"skl2onnx cannot convert {_qualified(model)}: {type(exc).__name__}: {exc}",
            hint="Register it with flavor='sklearn' instead",
        ) from None
    return proto, {"converted_from": _qualified(model), "skl2onnx_version": skl2onnx.__version__}


_flavors: dict[str, Flavor] = {f.name: f for f in (OnnxFlavor(), SklearnFlavor(), PyfuncFlavor())}


def register_flavor(flavor: Flavor) -> None:
    """Add a flavor, tried before the built-in ones when none is named."""
    if flavor.name in _flavors:
        raise ModelRegistryError(f"a flavor named {flavor.name!r} is already registered")
    items = [(flavor.name, flavor), *_flavors.items()]  # first in order: tried first
    _flavors.clear()
    _flavors.update(items)


def get_flavor(name: str) -> Flavor:
    found = _flavors.get(name)
    if found is None:
        raise ModelRegistryError(
            f"unknown model flavor {name!r}",
            hint=f"Use one of: {', '.join(_flavors)} (or flavor=None to pick by type)",
        )
    return found


def flavor_for(model: Any, name: str | None = None) -> Flavor:
    """The flavor to save `model` with: the one named, else the first that accepts it."""
    if name is not None:
        if not isinstance(name, str):
            raise ModelRegistryError(f"flavor must be a name, got {type(name).__name__}")
        chosen = get_flavor(name)
        if chosen.name != "onnx" and not chosen.accepts(model):
            raise ModelRegistryError(
                f"a {type(model).__name__} cannot be saved with the {name} flavor",
                hint="Leave flavor=None to pick one by the model's type",
            )
        return chosen
    for candidate in _flavors.values():
        if candidate.accepts(model):
            return candidate
    raise ModelRegistryError(
        f"a {type(model).__name__} is not a model keel can save",
        hint="A model is a scikit-learn estimator, an onnx.ModelProto, any object with a "
        "predict method, or a function; or pass a runs:/ URI or a keel.Step whose output "
        "is a model",
    )
