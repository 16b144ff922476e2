"""Workflow parameters: checked against the function's signature and type hints.

Validation is pydantic's (lax: the string "3" is accepted for an `int`, as the CLI
needs), imported only when a run starts. Recorded parameters must be JSON data so a
resumed run can get exactly the same values back.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable, Mapping
from typing import Any

from keel.errors import ParameterError


def _type_label(tp: Any) -> str:
    if tp is inspect.Parameter.empty:
        return "any"
    if typing.get_origin(tp) is typing.Annotated:
        tp = tp.__origin__  # `Annotated[int, Field(ge=1)]` reads as int
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class ParamValidator:
    def __init__(self, workflow: str, fn: Callable[..., Any], signature: inspect.Signature) -> None:
        from pydantic import ConfigDict, TypeAdapter

        self.workflow = workflow
        try:
            # With extras: constraints given as Annotated[int, Field(ge=1)] are checked.
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception:
            hints = {}
        self.params: dict[str, inspect.Parameter] = {}
        self.adapters: dict[str, Any] = {}
        self.labels: dict[str, str] = {}
        config = ConfigDict(arbitrary_types_allowed=True)
        for name, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            self.params[name] = param
            tp = hints.get(name, inspect.Parameter.empty)
            self.labels[name] = _type_label(tp)
            if tp is not inspect.Parameter.empty:
                self.adapters[name] = TypeAdapter(tp, config=config)
        self.accepts_extra = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())

    def validate(self, given: Mapping[str, Any], require_json: bool = True) -> dict[str, Any]:
        from pydantic import ValidationError

        unknown = [k for k in given if k not in self.params]
        if unknown and not self.accepts_extra:
            raise ParameterError(
                f"workflow {self.workflow} has no parameter {', '.join(map(repr, unknown))}",
                hint=f"Its parameters are: {self.describe() or '(none)'}",
            )
        out: dict[str, Any] = {}
        for name, param in self.params.items():
            if name not in given:
                if param.default is inspect.Parameter.empty:
                    raise ParameterError(
                        f"workflow {self.workflow} needs parameter {name!r} "
                        f"({self.labels[name]}), which was not given",
                        hint=f"Pass it, e.g. --param {name}=... on the command line",
                    )
                if _is_json_data(param.default):
                    # Recorded with the run, so a replay sees the same value even if
                    # the default changes in the code meanwhile.
                    out[name] = param.default
                continue
            value = given[name]
            adapter = self.adapters.get(name)
            if adapter is not None:
                try:
                    value = adapter.validate_python(value)
                except ValidationError as exc:
                    reason = exc.errors()[0].get("msg", "invalid")
                    raise ParameterError(
                        f"parameter {name!r} of workflow {self.workflow} expects "
                        f"{self.labels[name]}, got {given[name]!r} "
                        f"({type(given[name]).__name__}): {reason}",
                    ) from None
            out[name] = value
        for name in unknown:
            out[name] = given[name]
        if require_json:
            self.to_json(out)  # fail now, before anything is recorded
        return out

    def validate_cli(self, raw: Mapping[str, str]) -> dict[str, Any]:
        """Like `validate`, for `k=v` strings: JSON-decoded unless the parameter is a str."""
        decoded = {
            k: v if self.labels.get(k) == "str" else parse_cli_value(v) for k, v in raw.items()
        }
        return self.validate(decoded)

    def to_json(self, params: Mapping[str, Any]) -> str:
        from pydantic_core import PydanticSerializationError, to_jsonable_python

        try:
            return json.dumps(to_jsonable_python(dict(params)), sort_keys=True)
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            raise ParameterError(
                f"parameters of workflow {self.workflow} must be JSON data "
                f"(numbers, strings, lists, dicts, dates...): {exc}",
                hint="Pass a path or a name and load the object inside a task",
            ) from None

    def to_json_lenient(self, params: Mapping[str, Any]) -> str:
        """For display only (child runs): values that are not JSON data become their repr."""
        from pydantic_core import to_jsonable_python

        return json.dumps(to_jsonable_python(dict(params), fallback=repr), sort_keys=True)

    def describe(self) -> str:
        parts = []
        for name, param in self.params.items():
            default = "" if param.default is inspect.Parameter.empty else f"={param.default!r}"
            parts.append(f"{name}: {self.labels[name]}{default}")
        return ", ".join(parts)


def _is_json_data(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def parse_cli_value(text: str) -> Any:
    """A `--param k=v` value: JSON when it parses as JSON, else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text
