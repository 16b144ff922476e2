"""Cache keys, built from parts a user can read back (`keel cache explain`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from keel.sdk.definitions import Task
from keel.sdk.futures import StepFuture
from keel.store.serializers import encode
from keel.store.values import content_digest


def _has_future(value: Any) -> bool:
    if isinstance(value, StepFuture):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_future(v) for v in value)
    if isinstance(value, dict):
        return any(_has_future(v) for v in value.values())
    return False


def _input_digest(value: Any, what: str) -> str:
    """The content hash of one input; futures (at any depth) by their recorded output."""
    if isinstance(value, StepFuture):
        return value.stored.digest  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)) and _has_future(value):
        inner = ",".join(_input_digest(v, what) for v in value)
        return hashlib.sha256(f"{type(value).__name__}[{inner}]".encode()).hexdigest()
    if isinstance(value, dict) and _has_future(value):
        inner = ",".join(
            f"{k!r}:{_input_digest(v, what)}" for k, v in sorted(value.items(), key=repr)
        )
        return hashlib.sha256(f"dict{{{inner}}}".encode()).hexdigest()
    enc = encode(value, describe=lambda: what)
    return content_digest(enc.serializer, enc.data)


def cache_parts(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Everything the cache key depends on, by name (recorded with the step)."""

    def digest(name: str, value: Any) -> str:
        return _input_digest(value, f"input {name} of cached task {task.name}")

    inputs = {f"arg{i}": digest(f"arg{i}", v) for i, v in enumerate(args)}
    inputs.update({k: digest(repr(k), v) for k, v in sorted(kwargs.items())})
    return {
        "task": task.name,
        "code_hash": task.code_hash,
        "cache_version": task.opts.cache_version,
        "inputs": inputs,
    }


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
