"""A model's input signature: what its `predict` accepts, and the check at predict time.

Two kinds, inferred from an input example (or given):
- columns: a pandas DataFrame's column names and dtypes, in order;
- tensor: an array's shape, the first (batch) dimension left free, and its dtype.

A loaded model checks its input against the signature before predicting and raises
`SignatureError` naming the missing, extra or mistyped column, or the dimension or
dtype that differs. A dtype matches when it is the same, when it widens safely
(int32 -> int64), when it is any number or bool given for a float, or when both are text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keel.errors import ModelRegistryError, SignatureError

_TEXT = frozenset({"object", "str", "string", "string[python]", "string[pyarrow]"})


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    dtype: str | None  # None: any dtype (only the name is known)


@dataclass(frozen=True, slots=True)
class Signature:
    """`columns` for DataFrame input, else `shape` (None = any size) and `dtype`."""

    columns: tuple[Column, ...] | None = None
    shape: tuple[int | None, ...] | None = None
    dtype: str | None = None

    @property
    def kind(self) -> str:
        return "columns" if self.columns is not None else "tensor"

    def __str__(self) -> str:
        if self.columns is not None:
            return ", ".join(f"{c.name}: {c.dtype or 'any'}" for c in self.columns)
        return f"{_shape_text(self.shape or ())} {self.dtype or 'any dtype'}"

    def to_dict(self) -> dict[str, Any]:
        if self.columns is not None:
            return {"columns": [{"name": c.name, "dtype": c.dtype} for c in self.columns]}
        return {"shape": list(self.shape or ()), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Signature:
        """The inverse of `to_dict`; a malformed mapping is a ModelRegistryError."""
        try:
            if "columns" in data:
                cols = tuple(
                    Column(str(c["name"]), None if c.get("dtype") is None else str(c["dtype"]))
                    for c in data["columns"]
                )
                if not cols:
                    raise ValueError("no columns")
                return cls(columns=cols)
            shape = tuple(None if d is None or d == -1 else int(d) for d in data["shape"])
            if not shape:
                raise ValueError("an empty shape")
            dtype = data.get("dtype")
            return cls(shape=shape, dtype=None if dtype is None else str(dtype))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelRegistryError(
                f"not a signature: {dict(data)!r} ({exc})",
                hint="Give {'columns': [{'name': 'a', 'dtype': 'float64'}, ...]} or "
                "{'shape': [None, 4], 'dtype': 'float32'}, or an input_example to infer it from",
            ) from None

    # -- the check ------------------------------------------------------------------
    def check(self, data: Any) -> Any:
        """`data` as the model should get it (columns reordered, lists made arrays),
        or a SignatureError saying what does not match."""
        if self.columns is not None:
            return self._check_columns(data)
        return self._check_tensor(data)

    def _check_columns(self, data: Any) -> Any:
        import pandas as pd

        expected = [c.name for c in self.columns or ()]
        if isinstance(data, Mapping):
            data = pd.DataFrame(dict(data))
        if not isinstance(data, pd.DataFrame):
            raise SignatureError(
                f"the model expects a pandas DataFrame with columns {_names(expected)}, "
                f"got {type(data).__name__}",
                hint="Build a DataFrame with those columns",
            )
        labels = {str(c): c for c in data.columns}
        missing = [n for n in expected if n not in labels]
        if missing:
            raise SignatureError(
                f"input is missing column{'s' if len(missing) > 1 else ''} {_names(missing)} "
                f"(the model expects {_names(expected)})"
            )
        extra = [n for n in labels if n not in expected]
        if extra:
            raise SignatureError(
                f"input has column{'s' if len(extra) > 1 else ''} {_names(extra)} that the "
                f"model does not expect (it expects {_names(expected)})",
                hint="Drop the extra columns",
            )
        for col in self.columns or ():
            got = str(data[labels[col.name]].dtype)
            if col.dtype is not None and not compatible(col.dtype, got):
                raise SignatureError(
                    f"column {col.name!r} has dtype {got}; the model expects {col.dtype}",
                    hint=f"Convert it, e.g. df[{col.name!r}].astype({col.dtype!r})",
                )
        if list(labels) != expected:
            data = data[[labels[n] for n in expected]]
        return data

    def _check_tensor(self, data: Any) -> Any:
        import numpy as np

        shape = self.shape or ()
        if hasattr(data, "to_numpy") and not isinstance(data, np.ndarray):
            data = data.to_numpy()
        elif not isinstance(data, np.ndarray):
            try:
                data = np.asarray(data)
            except (TypeError, ValueError) as exc:
                raise SignatureError(
                    f"the model expects an array of shape {_shape_text(shape)}; "
                    f"{type(data).__name__} is not one ({exc})"
                ) from None
        if data.ndim != len(shape):
            raise SignatureError(
                f"input has shape {tuple(data.shape)} ({data.ndim} dimensions); the model "
                f"expects {_shape_text(shape)} ({len(shape)} dimensions)"
            )
        for axis, (want, got) in enumerate(zip(shape, data.shape, strict=True)):
            if want is not None and want != got:
                raise SignatureError(
                    f"input dimension {axis} has size {got}; the model expects {want} "
                    f"(shape {_shape_text(shape)}, got {tuple(data.shape)})"
                )
        if self.dtype is not None and not compatible(self.dtype, str(data.dtype)):
            raise SignatureError(
                f"input has dtype {data.dtype}; the model expects {self.dtype}",
                hint=f"Convert it, e.g. x.astype({self.dtype!r})",
            )
        return data


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("-1" if d is None else str(d) for d in shape) + ")"


def compatible(want: str, got: str) -> bool:
    """Whether data of dtype `got` may go where the signature says `want`."""
    if want == got or (want in _TEXT and got in _TEXT):
        return True
    import numpy as np

    try:
        w, g = np.dtype(want), np.dtype(got)
    except TypeError:
        return False
    if w.kind == "f" and g.kind in "biuf":
        return True
    if w.kind == "M" and g.kind == "M":
        return True
    return w.kind in "biuc" and bool(np.can_cast(g, w, "safe"))


# -- inference --------------------------------------------------------------------------


def infer_signature(example: Any) -> Signature:
    """The signature of data like `example`: a DataFrame, an array, a list of rows."""
    import numpy as np
    import pandas as pd

    if isinstance(example, Mapping):
        example = pd.DataFrame(dict(example))
    if isinstance(example, pd.DataFrame):
        if len(example.columns) == 0:
            raise ModelRegistryError("cannot infer a signature from a DataFrame with no columns")
        return Signature(
            columns=tuple(Column(str(name), str(dtype)) for name, dtype in example.dtypes.items())
        )
    if isinstance(example, pd.Series):
        example = example.to_numpy()
    if isinstance(example, list | tuple):
        try:
            example = np.asarray(example)
        except ValueError:
            example = None
    if isinstance(example, np.ndarray) and example.ndim >= 1 and example.dtype.kind != "O":
        return Signature(shape=(None, *example.shape[1:]), dtype=str(example.dtype))
    raise ModelRegistryError(
        f"cannot infer a signature from an input example of type {type(example).__name__}",
        hint="Give a pandas DataFrame, a numeric numpy array or a list of rows as "
        "input_example, or pass signature= yourself",
    )


def signature_from_estimator(model: Any) -> Signature | None:
    """What a fitted scikit-learn style estimator says it takes: its feature names, or
    its number of features (dtypes unknown)."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        try:
            return Signature(columns=tuple(Column(str(n), None) for n in names))
        except TypeError:
            return None
    count = getattr(model, "n_features_in_", None)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return Signature(shape=(None, count))
    return None


def as_signature(value: Any) -> Signature:
    """A Signature from a Signature or its `to_dict` form."""
    if isinstance(value, Signature):
        return value
    if isinstance(value, Mapping):
        return Signature.from_dict(value)
    raise ModelRegistryError(
        f"signature must be a keel Signature or a dict, got {type(value).__name__}",
        hint="Or pass input_example= and let keel infer it",
    )
