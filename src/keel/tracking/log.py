"""`keel.log_param`, `log_metric`, `set_tag`, `log_artifact` and friends.

Each call resolves the tracked run (tracking/active.py), checks its input at once
(so a bad call fails where it is made) and hands a row to the recorder, which
commits rows in batches: a metric per training batch costs a few microseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from keel.errors import InvalidValueError, TrackingError
from keel.executors.base import StepCall, after_step_hooks
from keel.store.artifacts import artifact_store
from keel.store.limits import check_finite, check_int64, check_text
from keel.store.tracking import (
    MAX_KEY_LENGTH,
    MAX_PARAM_LENGTH,
    MAX_PATH_LENGTH,
    MAX_TAG_LENGTH,
    load_params,
)
from keel.tracking.active import TrackedRun, current

_params_lock = threading.Lock()
_params_seen: dict[tuple[str, int], dict[str, str]] = {}
_flush_needed = threading.local()


def remember_params(run_id: str, seq: int, params: Mapping[str, str]) -> None:
    """Params recorded by other means (a workflow's own parameters) count as logged."""
    with _params_lock:
        _params_seen.setdefault((run_id, seq), {}).update(params)


def _check_key(kind: str, key: object) -> str:
    if not isinstance(key, str):
        raise TrackingError(
            f"{kind} keys must be strings, got {key!r} ({type(key).__name__})",
            hint=f"Use e.g. str({key!r}) as the key",
        )
    if not key or len(key) > MAX_KEY_LENGTH:
        raise TrackingError(
            f"{kind} key {key[:60]!r} must have 1 to {MAX_KEY_LENGTH} characters (has {len(key)})"
        )
    if key.startswith("/") or ".." in key.split("/"):
        raise TrackingError(f"{kind} key {key!r} may not start with '/' or contain '..'")
    return check_text(f"{kind} key", key, field=f"{kind} key")


def _check_value(kind: str, key: str, value: Any) -> str:
    """A param's or tag's value as the text stored (NUL and lone surrogates refused)."""
    return check_text(f"{kind} {key!r}: the value", str(value), field=f"{kind} value")


def _mark(run: TrackedRun) -> TrackedRun:
    _flush_needed.value = True
    return run


def _target() -> TrackedRun:
    run = current()
    assert run is not None
    return _mark(run)


# -- params -----------------------------------------------------------------------


def log_param(key: str, value: Any) -> None:
    """Record a parameter (stored as text). Logging it again with another value is an error."""
    log_params({key: value})


def log_params(params: Mapping[str, Any]) -> None:
    run = _target()
    rows: list[tuple[Any, ...]] = []
    with _params_lock:
        seen = _params_seen.get((run.run_id, run.seq))
        if seen is None:
            # Params logged by an earlier process (a resumed run) count too.
            seen = _params_seen[(run.run_id, run.seq)] = load_params(run.store, run.run_id, run.seq)
        for key, value in params.items():
            _check_key("param", key)
            text = _check_value("param", key, value)
            if len(text) > MAX_PARAM_LENGTH:
                raise TrackingError(
                    f"param {key!r} is {len(text)} characters long; the limit is "
                    f"{MAX_PARAM_LENGTH}",
                    run_id=run.run_id,
                    hint="Log long values with keel.log_text or keel.log_dict instead",
                )
            if key in seen:
                if seen[key] != text:
                    raise TrackingError(
                        f"param {key!r} was already logged as {seen[key][:100]!r}; "
                        f"it cannot change to {text[:100]!r}",
                        run_id=run.run_id,
                        hint="Params are fixed for a run: use a metric or a tag for values "
                        "that change, or a new run",
                    )
                continue
            rows.append((run.run_id, run.seq, key, text))
        for row in rows:
            seen[row[2]] = row[3]
    for row in rows:
        run.recorder.param(row)


# -- metrics ----------------------------------------------------------------------


def _metric_value(key: str, value: Any) -> tuple[float | None, bool]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TrackingError(
            f"metric {key!r} must be a number, got {value!r} ({type(value).__name__})"
        ) from None
    except OverflowError:  # an int beyond a float's range
        raise InvalidValueError(
            f"metric {key!r}: the value {value} is too large for a float", field="metric value"
        ) from None
    if math.isnan(number):
        return None, True
    return number, False


_good_metric_keys: set[str] = set()  # metric keys that passed _check_key


def _metric_row(
    run: TrackedRun, key: str, value: Any, step: Any, timestamp: float | None
) -> tuple[Any, ...]:
    # The common case (a key checked before, an int step) costs a few operations: a
    # training loop logs the same few keys again and again.
    if type(key) is not str or key not in _good_metric_keys:
        _check_key("metric", key)
        if len(_good_metric_keys) < 10_000:
            _good_metric_keys.add(key)
    number, is_nan = _metric_value(key, value)
    # INT64_MIN and INT64_MAX as literals: no global lookups per point.
    if step is not None and (
        type(step) is not int or not -9223372036854775808 <= step <= 9223372036854775807
    ):
        step = _check_step(step)
    return (
        run.run_id,
        run.seq,
        key,
        number,
        is_nan,
        step or 0,
        time.time() if timestamp is None else _check_timestamp(timestamp),
    )


def log_metric(
    key: str, value: float, step: int | None = None, timestamp: float | None = None
) -> None:
    """Record one point of a metric's history. NaN and ±inf are recorded as they are."""
    run = current()
    assert run is not None
    _flush_needed.value = True
    run.recorder.metric(_metric_row(run, key, value, step, timestamp))


def _check_step(step: Any) -> int:
    try:
        as_int = int(step)
    except (TypeError, ValueError):
        raise TrackingError(f"a metric step must be a whole number, got {step!r}") from None
    if as_int != step:
        raise TrackingError(f"a metric step must be a whole number, got {step!r}")
    return check_int64("a metric step", as_int, field="metric step")


def _check_timestamp(timestamp: Any) -> float:
    """Epoch seconds, a finite float."""
    try:
        at = float(timestamp)
    except (TypeError, ValueError, OverflowError):
        raise InvalidValueError(
            f"a metric timestamp must be epoch seconds, got {timestamp!r}",
            field="metric timestamp",
        ) from None
    return check_finite("a metric timestamp", at, field="metric timestamp")


def log_metrics(
    metrics: Mapping[str, float], step: int | None = None, timestamp: float | None = None
) -> None:
    """Record several metrics at one step; nothing is recorded if any of them is bad."""
    run = _target()
    at = time.time() if timestamp is None else _check_timestamp(timestamp)
    rows = [_metric_row(run, key, value, step, at) for key, value in metrics.items()]
    for row in rows:
        run.recorder.metric(row)


# -- tags -------------------------------------------------------------------------


def set_tag(key: str, value: Any) -> None:
    """Set a tag on the run (a later value replaces an earlier one)."""
    set_tags({key: value})


def check_tags(tags: Mapping[str, Any], run_id: str | None = None) -> dict[str, str]:
    """The tags as the texts stored, or a TrackingError for the first bad one."""
    out: dict[str, str] = {}
    for key, value in tags.items():
        _check_key("tag", key)
        text = _check_value("tag", key, value)
        if len(text) > MAX_TAG_LENGTH:
            raise TrackingError(
                f"tag {key!r} is {len(text)} characters long; the limit is {MAX_TAG_LENGTH}",
                run_id=run_id,
                hint="Log long values with keel.log_text instead",
            )
        out[key] = text
    return out


def set_tags(tags: Mapping[str, Any]) -> None:
    run = _target()
    for key, text in check_tags(tags, run.run_id).items():
        run.recorder.tag((run.run_id, run.seq, key, text))


# -- artifacts --------------------------------------------------------------------


def _artifact_path(path: str) -> str:
    if not isinstance(path, str):
        raise TrackingError(f"an artifact path must be a string, got {path!r}")
    clean = PurePosixPath(path.replace("\\", "/"))
    if clean.is_absolute() or ".." in clean.parts or not clean.parts:
        raise TrackingError(
            f"artifact path {path!r} must be relative and stay inside the run",
            hint="Use a path like 'plots/loss.png'",
        )
    return check_text("artifact path", str(clean), limit=MAX_PATH_LENGTH, field="artifact path")


def _log_bytes(run: TrackedRun, path: str, data: bytes, kind: str) -> None:
    where = _artifact_path(path)  # checked before any byte is stored
    digest = hashlib.sha256(data).hexdigest()
    url = run.store.config.artifacts_url
    artifact_store(url).put(digest, data)
    run.recorder.logged_artifact((run.run_id, run.seq, where, digest, len(data), kind, time.time()))


def log_artifact(local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    """Copy a file, or every file under a folder, into the run's artifacts."""
    source = Path(local_path)
    if not source.exists():
        raise TrackingError(f"cannot log artifact {str(source)!r}: no such file or folder")
    run = _target()
    prefix = artifact_path.strip("/") + "/" if artifact_path else ""
    if source.is_file():
        _log_bytes(run, prefix + source.name, source.read_bytes(), "file")
        return
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = file.relative_to(source).as_posix()
        _log_bytes(run, f"{prefix}{source.name}/{relative}", file.read_bytes(), "file")


def log_text(text: str, artifact_file: str) -> None:
    """Save `text` as the artifact `artifact_file` (e.g. 'notes/summary.txt')."""
    if not isinstance(text, str):
        raise TrackingError(f"log_text needs a str, got {type(text).__name__}")
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidValueError(
            f"the text for {artifact_file!r} has a lone surrogate ({text[exc.start]!r}) at "
            f"position {exc.start}, which is not valid Unicode",
            field="text",
            hint="Remove it, or encode the text yourself and log the file with log_artifact",
        ) from None
    _log_bytes(_target(), artifact_file, data, "text")


def log_dict(dictionary: Any, artifact_file: str) -> None:
    """Save a dict (or any JSON data) as a JSON artifact."""
    try:
        data = json.dumps(dictionary, indent=2, sort_keys=True, default=str).encode()
    except (TypeError, ValueError) as exc:
        raise TrackingError(f"cannot log {artifact_file!r} as JSON: {exc}") from None
    _log_bytes(_target(), artifact_file, data, "dict")


def log_figure(figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure; the format follows the file name (png, svg, pdf)."""
    import io

    if not hasattr(figure, "savefig"):
        raise TrackingError(
            f"log_figure needs a matplotlib Figure, got {type(figure).__name__}",
            hint="Pass plt.gcf() or the Figure you created",
        )
    buf = io.BytesIO()
    suffix = PurePosixPath(artifact_file).suffix.lstrip(".") or "png"
    figure.savefig(buf, format=suffix)
    _log_bytes(_target(), artifact_file, buf.getvalue(), "figure")


def log_table(data: Any, artifact_file: str) -> None:
    """Save a pandas DataFrame (or a dict of columns) as JSON, CSV or Parquet by extension."""
    import pandas as pd

    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    suffix = PurePosixPath(artifact_file).suffix.lower()
    if suffix == ".parquet":
        import io

        buf = io.BytesIO()
        frame.to_parquet(buf)
        payload = buf.getvalue()
    elif suffix == ".csv":
        payload = frame.to_csv(index=False).encode()
    elif suffix == ".json":
        payload = frame.to_json(orient="split", index=False).encode()
    else:
        raise TrackingError(
            f"log_table cannot write {artifact_file!r}",
            hint="Name the file .json, .csv or .parquet",
        )
    _log_bytes(_target(), artifact_file, payload, "table")


# -- durability at step end ----------------------------------------------------------------


def _flush_after_step(call: StepCall) -> None:
    """In a worker process, what the step logged is committed before it reports back.
    In the coordinating process the engine's own record of the step follows the
    tracking rows through the same recorder, which keeps them in order."""
    if not getattr(_flush_needed, "value", False):
        return
    _flush_needed.value = False
    if not call.away:
        return
    run = current(start=False)
    if run is not None:
        run.recorder.flush()
        # A row the database refused fails this step here, where it is known.
        run.recorder.raise_refused(run.run_id, run.seq)


after_step_hooks.append(_flush_after_step)
