"""The file sensor: a trigger that starts a run for each new file matching an fsspec
glob (`data/in/*.csv`, `s3://bucket/landing/**/*.parquet`).

The scheduler lists the files every `poll_seconds`; no worker slot is held while
nothing has arrived. The files it has fired for are kept in the trigger's state,
so each file starts one run (a file rewritten in place does not fire again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from keel.errors import ScheduleError
from keel.scheduler.triggers import Cause, TriggerInfo, fire_causes
from keel.sdk.definitions import Workflow
from keel.store.metadata import MetadataStore


def check_pattern(pattern: str) -> str:
    """A glob fsspec can list (its protocol installed); the pattern as given."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise ScheduleError("a file trigger needs a path pattern", hint="e.g. data/in/*.csv")
    import fsspec

    try:
        fsspec.core.url_to_fs(pattern)
    except (ImportError, ValueError) as exc:
        raise ScheduleError(
            f"cannot list {pattern!r}: {exc}",
            hint="Install the fsspec backend of its protocol (e.g. s3fs for s3://)",
        ) from None
    return pattern.strip()


def list_files(pattern: str) -> list[str]:
    """Files (not folders) matching `pattern`, as URLs of its protocol (plain paths
    for a local pattern given without file://)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    found: dict[str, Any] = fs.glob(path, detail=True)
    local = "://" not in pattern
    files = [p for p, info in found.items() if info.get("type") != "directory"]
    return sorted(p if local else fs.unstrip_protocol(p) for p in files)


def poll(
    store: MetadataStore,
    name: str,
    config: dict[str, Any],
    load: Callable[[str, str | None], Workflow[Any, Any]],
) -> list[str]:
    """List the files now (outside any transaction), then fire for the new ones."""
    files = list_files(config["pattern"])

    def find(
        conn: sa.Connection, info: TriggerInfo, state: dict[str, Any]
    ) -> tuple[list[Cause], dict[str, Any]]:
        seen = set(state.get("seen", []))
        fresh = [f for f in files if f not in seen]
        causes = [
            Cause(key=f, at=0.0, detail={"kind": "file", "path": f}, offered={"path": f})
            for f in fresh
        ]
        return causes, {"seen": sorted(seen | set(fresh))}

    return fire_causes(store, name, find, load)
