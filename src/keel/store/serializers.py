"""Serializers turn step values into bytes and back, chosen by the value's type.

The first registered serializer whose `accepts` says yes wins; cloudpickle takes
whatever no other serializer accepts. Libraries are imported only when a value
of their type shows up, so `import keel` stays fast.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from keel.errors import SerializationError


class Serializer(Protocol):
    """What a pluggable serializer provides. `name` is recorded with every value."""

    name: str

    def accepts(self, value: Any) -> bool: ...

    def dumps(self, value: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


_SCALARS = (str, int, float, bool, type(None))


def _is_plain(value: Any, depth: int = 0) -> bool:
    """True when JSON gives the value back exactly (lists stay lists, keys stay str)."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if depth > 50:
        return False
    if kind is list:
        return all(_is_plain(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in value.items())
    return False


class JsonSerializer:
    name = "json"

    def accepts(self, value: Any) -> bool:
        return _is_plain(value)

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


def _type_is(value: Any, module_prefix: str, type_name: str) -> bool:
    cls = type(value)
    return cls.__name__ == type_name and cls.__module__.startswith(module_prefix)


class NumpySerializer:
    """numpy arrays as `.npy` (no pickle inside: object arrays go to cloudpickle)."""

    name = "numpy"

    def accepts(self, value: Any) -> bool:
        return _type_is(value, "numpy", "ndarray") and value.dtype.kind != "O"

    def dumps(self, value: Any) -> bytes:
        import numpy as np

        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()

    def loads(self, data: bytes) -> Any:
        import numpy as np

        return np.load(io.BytesIO(data), allow_pickle=False)


class PandasSerializer:
    """pandas DataFrames as Parquet (needs pyarrow: `pip install keel[data]`)."""

    name = "parquet"

    def accepts(self, value: Any) -> bool:
        if not _type_is(value, "pandas", "DataFrame"):
            return False
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            return False
        # Parquet needs string column names; anything else goes to cloudpickle.
        return all(isinstance(c, str) for c in value.columns)

    def dumps(self, value: Any) -> bytes:
        buf = io.BytesIO()
        value.to_parquet(buf)
        return buf.getvalue()

    def loads(self, data: bytes) -> Any:
        import pandas as pd

        return pd.read_parquet(io.BytesIO(data))


class CloudpickleSerializer:
    name = "cloudpickle"

    def accepts(self, value: Any) -> bool:
        return True

    def dumps(self, value: Any) -> bytes:
        import cloudpickle

        return bytes(cloudpickle.dumps(value))

    def loads(self, data: bytes) -> Any:
        import pickle

        return pickle.loads(data)


_registry: list[Serializer] = [
    JsonSerializer(),
    NumpySerializer(),
    PandasSerializer(),
    CloudpickleSerializer(),
]
_by_name: dict[str, Serializer] = {s.name: s for s in _registry}


def register_serializer(serializer: Serializer) -> None:
    """Add a serializer, tried before the built-in ones. Its `name` must be unique."""
    if serializer.name in _by_name:
        raise SerializationError(
            f"a serializer named {serializer.name!r} is already registered",
            hint="Give yours another name",
        )
    _registry.insert(0, serializer)
    _by_name[serializer.name] = serializer


def serializer_for(value: Any) -> Serializer:
    for candidate in _registry:
        if candidate.accepts(value):
            return candidate
    raise AssertionError("cloudpickle accepts everything")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class Encoded:
    serializer: str
    data: bytes
    type_name: str


def type_name(value: Any) -> str:
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def encode(value: Any, *, describe: Callable[[], str] = lambda: "value") -> Encoded:
    """Serialize `value`; a failure names what was being serialized and its type."""
    serializer = serializer_for(value)
    try:
        data = serializer.dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize the {describe()} of type {type_name(value)} "
            f"with {serializer.name}: {exc}",
            hint="Return plain data, numpy arrays, DataFrames or picklable objects, "
            "or register a serializer with keel.register_serializer",
        ) from None
    return Encoded(serializer.name, data, type_name(value))


def decode(serializer: str, data: bytes) -> Any:
    try:
        codec = _by_name[serializer]
    except KeyError:
        raise SerializationError(
            f"no serializer named {serializer!r} is registered in this process",
            hint="Import the module that registers it before reading this value",
        ) from None
    return codec.loads(data)
