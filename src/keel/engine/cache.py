"""Cache keys, built from parts a user can read back (`keel cache explain`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from keel.sdk.definitions import Task
from keel.sdk.futures import StepFuture
from keel.store.serializers import encode
from keel.store.values import content_digest


def _input_digest(value: Any) -> str:
    if isinstance(value, StepFuture):
        return value.stored.digest  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)) and any(isinstance(v, StepFuture) for v in value):
        inner = ",".join(_input_digest(v) for v in value)
        return hashlib.sha256(f"{type(value).__name__}[{inner}]".encode()).hexdigest()
    if isinstance(value, dict) and any(isinstance(v, StepFuture) for v in value.values()):
        inner = ",".join(f"{k!r}:{_input_digest(v)}" for k, v in sorted(value.items(), key=repr))
        return hashlib.sha256(f"dict{{{inner}}}".encode()).hexdigest()
    enc = encode(value, describe=lambda: "cached task input")
    return content_digest(enc.serializer, enc.data)


def cache_parts(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Everything the cache key depends on, by name (recorded with the step)."""
    inputs = {f"arg{i}": _input_digest(v) for i, v in enumerate(args)}
    inputs.update({k: _input_digest(v) for k, v in sorted(kwargs.items())})
    return {
        "task": task.name,
        "code_hash": task.code_hash,
        "cache_version": task.opts.cache_version,
        "inputs": inputs,
    }


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
