"""SQL of the model registry: versions, aliases, tags, descriptions and the audit log.

Every change to a model runs in one transaction that starts by touching the model's
row (`updated_at`): on PostgreSQL that locks the row, on SQLite it takes the write
lock. Changes to one model are therefore serial, so two processes registering at
once get distinct version numbers and each alias move records the true previous
version. The primary key (name, version) backs that up: a conflict is retried.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Row

from keel.errors import ModelNotFoundError
from keel.store.metadata import MetadataStore
from keel.store.schema import model_aliases, model_versions, models, registry_events, steps

T = TypeVar("T")
_RETRIES = 20


def _transaction(store: MetadataStore, work: Callable[[sa.Connection], T]) -> T:
    for attempt in range(_RETRIES):
        try:
            with store.engine.begin() as conn:
                return work(conn)
        except sa.exc.IntegrityError:
            if attempt == _RETRIES - 1:
                raise
            time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _lock_model(conn: sa.Connection, store: MetadataStore, name: str, now: float) -> None:
    done = conn.execute(models.update().where(models.c.name == name).values(updated_at=now))
    if not done.rowcount:
        raise no_model(store, name)


def _event(
    conn: sa.Connection, name: str, action: str, actor: str, now: float, **fields: Any
) -> None:
    detail = fields.pop("detail", None)
    conn.execute(
        registry_events.insert().values(
            name=name,
            action=action,
            actor=actor,
            at=now,
            detail=json.dumps(detail, sort_keys=True) if detail is not None else None,
            **fields,
        )
    )


# -- errors that say what exists ---------------------------------------------------------


def no_model(store: MetadataStore, name: str) -> ModelNotFoundError:
    names = [m.name for m in list_models(store)]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f"Did you mean {', '.join(map(repr, close))}?" if close else None
    if hint is None:
        hint = "Registered models: " + ", ".join(names[:10]) if names else "No model is registered"
    return ModelNotFoundError(
        f"no registered model named {name!r}", hint=hint + " (see `keel models ls`)"
    )


def no_version(store: MetadataStore, name: str, version: int) -> ModelNotFoundError:
    numbers = version_numbers(store, name)
    span = f"versions 1 to {numbers[-1]}" if numbers else "no versions"
    return ModelNotFoundError(
        f"model {name!r} has no version {version} (it has {span})",
        hint=f"See them with `keel models show {name}`",
    )


# -- writes ------------------------------------------------------------------------------


def create_version(store: MetadataStore, values: Mapping[str, Any], actor: str) -> int:
    """Insert the next version of `values['name']` (creating the model); its number."""
    name = values["name"]

    def work(conn: sa.Connection) -> int:
        now = time.time()
        insert = _insert_ignore(store)(models).values(name=name, created_at=now, updated_at=now)
        conn.execute(insert.on_conflict_do_nothing())
        _lock_model(conn, store, name, now)
        top = conn.execute(
            sa.select(sa.func.max(model_versions.c.version)).where(model_versions.c.name == name)
        ).scalar()
        version = int(top or 0) + 1
        row = {**values, "version": version, "created_at": now, "created_by": actor}
        conn.execute(model_versions.insert().values(**row))
        detail = {"flavor": values["flavor"], "run_id": values.get("run_id")}
        _event(conn, name, "create_version", actor, now, version=version, detail=detail)
        return version

    return _transaction(store, work)


def _insert_ignore(store: MetadataStore) -> Any:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


def set_alias(store: MetadataStore, name: str, alias: str, version: int, actor: str) -> int | None:
    """Point `alias` at `version`; the version it pointed at before (None if new)."""

    def work(conn: sa.Connection) -> int | None:
        now = time.time()
        _lock_model(conn, store, name, now)
        if _version_row(conn, name, version) is None:
            raise no_version(store, name, version)
        previous = _alias_version(conn, name, alias)
        values = {"version": version, "updated_at": now, "updated_by": actor}
        if previous is None:
            conn.execute(model_aliases.insert().values(name=name, alias=alias, **values))
        else:
            conn.execute(
                model_aliases.update()
                .where(model_aliases.c.name == name, model_aliases.c.alias == alias)
                .values(**values)
            )
        _event(
            conn, name, "set_alias", actor, now, alias=alias, version=version,
            previous_version=previous,
        )  # fmt: skip
        return previous

    return _transaction(store, work)


def delete_alias(store: MetadataStore, name: str, alias: str, actor: str) -> int:
    """Remove `alias`; the version it pointed at."""

    def work(conn: sa.Connection) -> int:
        now = time.time()
        _lock_model(conn, store, name, now)
        previous = _alias_version(conn, name, alias)
        if previous is None:
            raise no_alias(store, name, alias)
        conn.execute(
            model_aliases.delete().where(
                model_aliases.c.name == name, model_aliases.c.alias == alias
            )
        )
        _event(conn, name, "delete_alias", actor, now, alias=alias, previous_version=previous)
        return previous

    return _transaction(store, work)


def no_alias(store: MetadataStore, name: str, alias: str) -> ModelNotFoundError:
    known = sorted(aliases(store, name))
    return ModelNotFoundError(
        f"model {name!r} has no alias {alias!r}",
        hint=f"Its aliases: {', '.join(known)}"
        if known
        else f"Model {name!r} has no aliases; "
        f"set one with keel.models.set_alias({name!r}, 'champion', VERSION)",
    )


def update_version(
    store: MetadataStore,
    name: str,
    version: int,
    actor: str,
    *,
    action: str,
    detail: dict[str, Any],
    change: Callable[[Row[Any]], dict[str, Any]],
) -> None:
    """Change columns of one version (computed from its current row) and log `action`."""

    def work(conn: sa.Connection) -> None:
        now = time.time()
        _lock_model(conn, store, name, now)
        row = _version_row(conn, name, version)
        if row is None:
            raise no_version(store, name, version)
        conn.execute(
            model_versions.update()
            .where(model_versions.c.name == name, model_versions.c.version == version)
            .values(**change(row))
        )
        _event(conn, name, action, actor, now, version=version, detail=detail)

    _transaction(store, work)


def set_model_description(store: MetadataStore, name: str, text: str | None, actor: str) -> None:
    def work(conn: sa.Connection) -> None:
        now = time.time()
        _lock_model(conn, store, name, now)
        conn.execute(models.update().where(models.c.name == name).values(description=text))
        _event(conn, name, "set_description", actor, now, detail={"description": text})

    _transaction(store, work)


# -- reads -------------------------------------------------------------------------------


def _version_row(conn: sa.Connection, name: str, version: int) -> Row[Any] | None:
    return conn.execute(
        sa.select(model_versions).where(
            model_versions.c.name == name, model_versions.c.version == version
        )
    ).first()


def _alias_version(conn: sa.Connection, name: str, alias: str) -> int | None:
    found = conn.execute(
        sa.select(model_aliases.c.version).where(
            model_aliases.c.name == name, model_aliases.c.alias == alias
        )
    ).scalar()
    return None if found is None else int(found)


def get_model(store: MetadataStore, name: str) -> Row[Any] | None:
    with store.engine.connect() as conn:
        return conn.execute(sa.select(models).where(models.c.name == name)).first()


def list_models(store: MetadataStore) -> list[Row[Any]]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(models).order_by(models.c.name)))


def get_version(store: MetadataStore, name: str, version: int) -> Row[Any] | None:
    with store.engine.connect() as conn:
        return _version_row(conn, name, version)


def list_versions(store: MetadataStore, name: str | None = None) -> list[Row[Any]]:
    stmt = sa.select(model_versions).order_by(model_versions.c.name, model_versions.c.version)
    if name is not None:
        stmt = stmt.where(model_versions.c.name == name)
    with store.engine.connect() as conn:
        return list(conn.execute(stmt))


def version_numbers(store: MetadataStore, name: str) -> list[int]:
    stmt = (
        sa.select(model_versions.c.version)
        .where(model_versions.c.name == name)
        .order_by(model_versions.c.version)
    )
    with store.engine.connect() as conn:
        return [int(v) for v in conn.execute(stmt).scalars()]


def alias_version(store: MetadataStore, name: str, alias: str) -> int | None:
    with store.engine.connect() as conn:
        return _alias_version(conn, name, alias)


def aliases(store: MetadataStore, name: str | None = None) -> dict[str, int]:
    """alias -> version for one model; `name/alias` -> version for all models."""
    stmt = sa.select(model_aliases).order_by(model_aliases.c.name, model_aliases.c.alias)
    if name is not None:
        stmt = stmt.where(model_aliases.c.name == name)
    with store.engine.connect() as conn:
        rows = list(conn.execute(stmt))
    if name is not None:
        return {r.alias: int(r.version) for r in rows}
    return {f"{r.name}/{r.alias}": int(r.version) for r in rows}


def events(store: MetadataStore, name: str) -> list[Row[Any]]:
    stmt = (
        sa.select(registry_events)
        .where(registry_events.c.name == name)
        .order_by(registry_events.c.id)
    )
    with store.engine.connect() as conn:
        return list(conn.execute(stmt))


def step_keys(store: MetadataStore, pairs: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """The keys of the steps (run_id, seq) named, for showing versions."""
    if not pairs:
        return {}
    stmt = sa.select(steps.c.run_id, steps.c.seq, steps.c.key).where(
        sa.tuple_(steps.c.run_id, steps.c.seq).in_(sorted(pairs))
    )
    with store.engine.connect() as conn:
        return {(r.run_id, r.seq): r.key for r in conn.execute(stmt)}
