"""Cache keys, built from parts a user can read back (`keel cache explain`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from keel.sdk.definitions import Task
from keel.sdk.futures import StepFuture
from keel.store.serializers import decode, encode, serializer_for
from keel.store.values import content_digest

_MISSING = object()
# Serializers whose recorded bytes are decoded to key a future by value: plain data,
# never a pickle (which could need code this process lacks, or run code).
_DECODED_FOR_KEYS = frozenset({"json", "numpy"})


def _resolved(value: Any) -> Any:
    """`value` with every future replaced by its recorded value when that value is
    small plain data, so a list of futures keys like the equal plain list; _MISSING
    otherwise (the futures are then keyed by their outputs' digests)."""
    if isinstance(value, StepFuture):
        stored = value.stored
        if stored.inline is None or stored.serializer not in _DECODED_FOR_KEYS:
            return _MISSING
        return decode(stored.serializer, stored.inline)
    if isinstance(value, (list, tuple)):
        items = [_resolved(v) for v in value]
        if any(v is _MISSING for v in items):
            return _MISSING
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        resolved = {k: _resolved(v) for k, v in value.items()}
        if any(v is _MISSING for v in resolved.values()):
            return _MISSING
        return resolved
    return value


def _has_future(value: Any) -> bool:
    if isinstance(value, StepFuture):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_future(v) for v in value)
    if isinstance(value, dict):
        return any(_has_future(v) for v in value.values())
    return False


def _value_digest(value: Any, what: str) -> str:
    """The content hash of a plain value. JSON-like data is hashed with sorted keys:
    equal dicts key alike whatever order their items were inserted in."""
    if serializer_for(value).name == "json":
        canonical = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
        return content_digest("json", canonical.encode())
    enc = encode(value, describe=lambda: what)
    return content_digest(enc.serializer, enc.data)


def _input_digest(value: Any, what: str) -> str:
    """The content hash of one input, futures (at any depth) by their recorded output:
    by value when it is small, else by its digest."""
    if not _has_future(value):
        return _value_digest(value, what)
    resolved = _resolved(value)
    if resolved is not _MISSING:
        return _value_digest(resolved, what)
    if isinstance(value, StepFuture):
        return value.stored.digest  # type: ignore[no-any-return]
    if isinstance(value, (list, tuple)):
        inner = ",".join(_input_digest(v, what) for v in value)
        return hashlib.sha256(f"{type(value).__name__}[{inner}]".encode()).hexdigest()
    inner = ",".join(f"{k!r}:{_input_digest(v, what)}" for k, v in sorted(value.items(), key=repr))
    return hashlib.sha256(f"dict{{{inner}}}".encode()).hexdigest()


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
