"""The model registry through MLflow: registered models, versions, aliases, tags.

It is keel's registry (keel_models, keel_model_versions, keel_model_aliases), so a
version registered with `mlflow.register_model` shows in `keel models`, and keel's
own versions show here. A version registered through MLflow has flavor "mlflow" and
points at a logged model (`models:/m-...`) or a folder of a run's artifacts, whose
files are pinned (copied by content hash) when the version is created; get-download-uri
answers the pinned copies (`mlflow-artifacts:/keel-models/NAME/VERSION`), and keel's own
versions are presented there as MLflow model directories.
Changes need the admin role, as every registry change on this server does, and go to
the registry's audit log (keel_registry_events).
"""

from __future__ import annotations

import json
import re
import time
from functools import partial
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response

from keel.server.mlflow import filtering
from keel.server.mlflow.artifacts import KEEL_MODELS
from keel.server.mlflow.common import (
    Admin,
    Args,
    MlflowError,
    MlflowRoute,
    Store,
    Viewer,
    decode_token,
    encode_token,
    int_arg,
    invalid,
    key_values,
    list_arg,
    ms,
    not_found,
    pairs,
    reply,
    stored_id,
    text_arg,
)
from keel.server.mlflow.data import check_tags
from keel.server.mlflow.logged_models import get_model_row, location
from keel.server.mlflow.mapping import exp_out, find, step_id
from keel.store import registry_store as rs
from keel.store.metadata import MetadataStore
from keel.store.schema import model_aliases, model_versions, models, registry_events
from keel.tracking.pins import PINNED, pin_mlflow_files, pinned_files

router = APIRouter(route_class=MlflowRoute)
_LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]{32})/?$")


# -- JSON ----------------------------------------------------------------------------------


def version_json(row: Any, aliases: list[str]) -> dict[str, Any]:
    meta = json.loads(row.meta) if row.meta else {}
    out: dict[str, Any] = {
        "name": row.name,
        "version": str(row.version),
        "creation_timestamp": ms(row.created_at),
        "last_updated_timestamp": ms(row.created_at),
        "current_stage": "None",
        "source": meta.get("mlflow_source")
        or row.source_uri
        or f"models:/{row.name}/{row.version}",
        "status": "READY" if row.status == "READY" else "PENDING_REGISTRATION",
        "tags": pairs(json.loads(row.tags) if row.tags else {}),
        "aliases": aliases,
    }
    if row.run_id:
        out["run_id"] = row.run_id if row.seq is None else step_id(row.run_id, row.seq)
    for key, value in (
        ("user_id", row.created_by),
        ("description", row.description),
        ("model_id", meta.get("mlflow_model_id")),
    ):
        if value:
            out[key] = value
    return out


def _aliases_by_version(store: MetadataStore, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, version in rs.aliases(store, name).items():
        out.setdefault(version, []).append(alias)
    return out


def model_json(store: MetadataStore, row: Any) -> dict[str, Any]:
    named = rs.aliases(store, row.name)
    by_version = _aliases_by_version(store, row.name)
    versions = rs.list_versions(store, row.name)
    out: dict[str, Any] = {
        "name": row.name,
        "creation_timestamp": ms(row.created_at),
        "last_updated_timestamp": ms(row.updated_at),
        "tags": pairs(json.loads(row.tags) if row.tags else {}),
        "aliases": [{"alias": a, "version": str(v)} for a, v in sorted(named.items())],
    }
    if row.description:
        out["description"] = row.description
    if versions:
        last = versions[-1]
        out["latest_versions"] = [version_json(last, by_version.get(int(last.version), []))]
    return out


def _model_row(store: MetadataStore, name: str) -> Any:
    row = rs.get_model(store, name)
    if row is None:
        raise not_found(f"Registered Model with name={name} not found")
    return row


def _version_row(store: MetadataStore, args: dict[str, Any]) -> Any:
    name = text_arg(args, "name")
    _model_row(store, name)
    text = text_arg(args, "version")
    number = stored_id(text)
    row = rs.get_version(store, name, number) if number is not None else None
    if row is None:
        raise not_found(f"Model Version (name={name}, version={text}) not found")
    return row


# -- registered models ---------------------------------------------------------------------


def _event(conn: sa.Connection, name: str, action: str, actor: str, **fields: Any) -> None:
    conn.execute(
        registry_events.insert().values(
            name=name, action=action, actor=actor, at=time.time(), **fields
        )
    )


@router.post("/registered-models/create")
def create_model(args: Args, store: Store, principal: Admin) -> Response:
    name = text_arg(args, "name").strip()
    if not name or len(name) > 250 or "/" in name:
        raise invalid("a registered model name must have 1 to 250 characters and no '/'")
    tags = key_values(args, "tags")
    check_tags(tags)
    now = time.time()
    try:
        with store.engine.begin() as conn:
            conn.execute(
                models.insert().values(
                    name=name,
                    description=text_arg(args, "description", required=False) or None,
                    tags=json.dumps(tags) if tags else None,
                    created_at=now,
                    updated_at=now,
                )
            )
            _event(conn, name, "create_model", principal.name)
    except sa.exc.IntegrityError:
        raise MlflowError(
            "RESOURCE_ALREADY_EXISTS", f"Registered Model (name={name}) already exists."
        ) from None
    return reply({"registered_model": model_json(store, _model_row(store, name))})


@router.get("/registered-models/get")
def get_model(args: Args, store: Store, _: Viewer) -> Response:
    row = _model_row(store, text_arg(args, "name"))
    return reply({"registered_model": model_json(store, row)})


def _touch(store: MetadataStore, name: str, actor: str, action: str, **values: Any) -> None:
    _model_row(store, name)
    with store.engine.begin() as conn:
        conn.execute(
            models.update().where(models.c.name == name).values(updated_at=time.time(), **values)
        )
        _event(conn, name, action, actor, detail=json.dumps(values, sort_keys=True))


@router.patch("/registered-models/update")
def update_model(args: Args, store: Store, principal: Admin) -> Response:
    name = text_arg(args, "name")
    description = text_arg(args, "description", required=False)
    _touch(store, name, principal.name, "set_description", description=description or None)
    return reply({"registered_model": model_json(store, _model_row(store, name))})


@router.delete("/registered-models/delete")
def delete_model(args: Args, store: Store, principal: Admin) -> Response:
    name = text_arg(args, "name")
    _model_row(store, name)
    with store.engine.begin() as conn:
        conn.execute(model_aliases.delete().where(model_aliases.c.name == name))
        conn.execute(model_versions.delete().where(model_versions.c.name == name))
        conn.execute(models.delete().where(models.c.name == name))
        _event(conn, name, "delete_model", principal.name)
    return reply({})


def _model_tags(store: MetadataStore, args: dict[str, Any], actor: str, value: str | None) -> None:
    name, key = text_arg(args, "name"), text_arg(args, "key")
    row = _model_row(store, name)
    tags = json.loads(row.tags) if row.tags else {}
    if value is None:
        if key not in tags:
            raise not_found(f"No tag with key {key!r} on registered model {name}")
        del tags[key]
    else:
        check_tags({key: value})
        tags[key] = value
    _touch(store, name, actor, "set_tags", tags=json.dumps(tags) if tags else None)


@router.post("/registered-models/set-tag")
def set_model_tag(args: Args, store: Store, principal: Admin) -> Response:
    _model_tags(store, args, principal.name, text_arg(args, "value", required=False))
    return reply({})


@router.delete("/registered-models/delete-tag")
def delete_model_tag(args: Args, store: Store, principal: Admin) -> Response:
    _model_tags(store, args, principal.name, None)
    return reply({})


def _page(items: list[Any], args: dict[str, Any], default: int) -> tuple[list[Any], str | None]:
    limit = int_arg(args, "max_results", default, 200_000)
    offset = decode_token(args.get("page_token"))
    more = offset + limit < len(items)
    return items[offset : offset + limit], encode_token(offset + limit) if more else None


def _model_lookup(row: Any, c: filtering.Cond) -> Any:
    if c.kind == "tags":
        return json.loads(row.tags or "{}").get(c.key)
    if c.kind == "attr" and c.key == "name":
        return row.name
    raise invalid(f"cannot search registered models by {c.kind}.{c.key}")


@router.api_route("/registered-models/search", methods=["GET", "POST"])
def search_models(args: Args, store: Store, _: Viewer) -> Response:
    conds = filtering.parse(args.get("filter"))

    rows = [r for r in rs.list_models(store) if filtering.keep(conds, partial(_model_lookup, r))]
    page, token = _page(rows, args, 100)
    body: dict[str, Any] = {"registered_models": [model_json(store, r) for r in page]}
    if token:
        body["next_page_token"] = token
    return reply(body)


@router.api_route("/registered-models/get-latest-versions", methods=["GET", "POST"])
def latest_versions(args: Args, store: Store, _: Viewer) -> Response:
    name = text_arg(args, "name")
    _model_row(store, name)
    stages = [str(s).lower() for s in list_arg(args, "stages")]
    versions = rs.list_versions(store, name)
    if not versions or (stages and "none" not in stages):
        return reply({"model_versions": []})
    last = versions[-1]
    aliases = _aliases_by_version(store, name).get(int(last.version), [])
    return reply({"model_versions": [version_json(last, aliases)]})


# -- versions ------------------------------------------------------------------------------


@router.post("/model-versions/create")
def create_version(args: Args, store: Store, principal: Admin) -> Response:
    name = text_arg(args, "name")
    _model_row(store, name)
    source = text_arg(args, "source")
    model_id = text_arg(args, "model_id", required=False)
    match = _LOGGED_MODEL_URI.match(source)
    if not model_id and match:
        model_id = match.group(1)
    if model_id:
        get_model_row(store, model_id)
    run_text = text_arg(args, "run_id", required=False)
    run = find(store, run_text) if run_text else None
    tags = key_values(args, "tags")
    check_tags(tags)
    meta: dict[str, Any] = {"mlflow_source": source, "mlflow_model_id": model_id or None}
    # A version never changes: the files keel holds for it are pinned now, by content
    # hash, and it is loaded (by keel and by MLflow clients) only from those copies.
    seq = run.seq if run is not None and run.seq >= 0 else None
    pinned = pin_mlflow_files(store, meta, run.run_id if run is not None else None, seq)
    if pinned is not None:
        meta[PINNED] = pinned
    values = {
        "name": name,
        "flavor": "mlflow",
        "source_hash": None,
        "source_uri": source,
        "signature": None,
        "meta": json.dumps(meta, sort_keys=True),
        "run_id": run.run_id if run is not None else None,
        "seq": run.seq if run is not None and run.seq >= 0 else None,
        "description": text_arg(args, "description", required=False) or None,
        "tags": json.dumps(tags, sort_keys=True) if tags else None,
        "status": "READY",
    }
    version = rs.create_version(store, values, principal.name)
    row = rs.get_version(store, name, version)
    return reply({"model_version": version_json(row, [])})


def _version_answer(store: MetadataStore, row: Any) -> Response:
    aliases = _aliases_by_version(store, row.name).get(int(row.version), [])
    return reply({"model_version": version_json(row, aliases)})


@router.get("/model-versions/get")
def get_version(args: Args, store: Store, _: Viewer) -> Response:
    return _version_answer(store, _version_row(store, args))


def _change_version(
    store: MetadataStore, row: Any, actor: str, action: str, values: dict[str, Any]
) -> None:
    rs.update_version(
        store, row.name, int(row.version), actor, action=action, detail=values,
        change=lambda _row: values,
    )  # fmt: skip


@router.patch("/model-versions/update")
def update_version(args: Args, store: Store, principal: Admin) -> Response:
    row = _version_row(store, args)
    description = text_arg(args, "description", required=False) or None
    _change_version(store, row, principal.name, "set_description", {"description": description})
    return _version_answer(store, _version_row(store, args))


@router.delete("/model-versions/delete")
def delete_version(args: Args, store: Store, principal: Admin) -> Response:
    row = _version_row(store, args)
    name, version = row.name, int(row.version)
    with store.engine.begin() as conn:
        conn.execute(
            model_aliases.delete().where(
                model_aliases.c.name == name, model_aliases.c.version == version
            )
        )
        conn.execute(
            model_versions.delete().where(
                model_versions.c.name == name, model_versions.c.version == version
            )
        )
        _event(conn, name, "delete_version", principal.name, version=version)
    return reply({})


def _version_tags(
    store: MetadataStore, args: dict[str, Any], actor: str, value: str | None
) -> None:
    row = _version_row(store, args)
    key = text_arg(args, "key")
    tags = json.loads(row.tags) if row.tags else {}
    if value is None:
        if key not in tags:
            raise not_found(f"No tag with key {key!r} on version {row.version} of {row.name}")
        del tags[key]
    else:
        check_tags({key: value})
        tags[key] = value
    text = json.dumps(tags, sort_keys=True) if tags else None
    action = "set_version_tag" if value is not None else "delete_version_tag"
    _change_version(store, row, actor, action, {"tags": text})


@router.post("/model-versions/set-tag")
def set_version_tag(args: Args, store: Store, principal: Admin) -> Response:
    _version_tags(store, args, principal.name, text_arg(args, "value", required=False))
    return reply({})


@router.delete("/model-versions/delete-tag")
def delete_version_tag(args: Args, store: Store, principal: Admin) -> Response:
    _version_tags(store, args, principal.name, None)
    return reply({})


def _version_lookup(row: Any, c: filtering.Cond) -> Any:
    if c.kind == "tags":
        return json.loads(row.tags or "{}").get(c.key)
    if c.kind == "attr":
        if c.key == "name":
            return row.name
        if c.key in ("version", "version_number"):
            return float(row.version)
        if c.key == "run_id":
            return row.run_id if row.seq is None else step_id(row.run_id, row.seq)
        if c.key in ("source", "source_path"):
            return json.loads(row.meta or "{}").get("mlflow_source") or row.source_uri
    raise invalid(f"cannot search model versions by {c.kind}.{c.key}")


@router.api_route("/model-versions/search", methods=["GET", "POST"])
def search_versions(args: Args, store: Store, _: Viewer) -> Response:
    conds = filtering.parse(args.get("filter"))
    rows = [
        r for r in rs.list_versions(store) if filtering.keep(conds, partial(_version_lookup, r))
    ]
    rows.sort(key=lambda r: (r.name, -int(r.version)))
    page, token = _page(rows, args, 10_000)
    named: dict[str, dict[int, list[str]]] = {}
    out = []
    for row in page:
        if row.name not in named:
            named[row.name] = _aliases_by_version(store, row.name)
        out.append(version_json(row, named[row.name].get(int(row.version), [])))
    body: dict[str, Any] = {"model_versions": out}
    if token:
        body["next_page_token"] = token
    return reply(body)


@router.get("/model-versions/get-download-uri")
def download_uri(args: Args, store: Store, _: Viewer) -> Response:
    row = _version_row(store, args)
    meta = json.loads(row.meta) if row.meta else {}
    if row.flavor != "mlflow" or pinned_files(meta) is not None:  # its pinned files
        return reply({"artifact_uri": f"mlflow-artifacts:/{KEEL_MODELS}/{row.name}/{row.version}"})
    if meta.get("mlflow_model_id"):
        model = get_model_row(store, meta["mlflow_model_id"])
        return reply(
            {"artifact_uri": location(exp_out(store, model.experiment_id), model.model_id)}
        )
    return reply({"artifact_uri": meta.get("mlflow_source") or row.source_uri})


# -- aliases -------------------------------------------------------------------------------


def _alias(args: dict[str, Any]) -> str:
    alias = text_arg(args, "alias")
    if alias.lower() == "latest" or re.fullmatch(r"v?\d+", alias, re.IGNORECASE):
        raise invalid(f"{alias!r} cannot be an alias: 'latest' and version numbers are reserved")
    if len(alias) > 250:
        raise invalid("an alias may have at most 250 characters")
    return alias


@router.post("/registered-models/alias")
def set_alias(args: Args, store: Store, principal: Admin) -> Response:
    row = _version_row(store, args)
    rs.set_alias(store, row.name, _alias(args), int(row.version), principal.name)
    return reply({})


@router.get("/registered-models/alias")
def get_alias(args: Args, store: Store, _: Viewer) -> Response:
    name, alias = text_arg(args, "name"), text_arg(args, "alias")
    _model_row(store, name)
    version = rs.alias_version(store, name, alias)
    row = rs.get_version(store, name, version) if version is not None else None
    if row is None:
        raise not_found(f"Registered model alias {alias} not found.")
    return _version_answer(store, row)


@router.delete("/registered-models/alias")
def delete_alias(args: Args, store: Store, principal: Admin) -> Response:
    name, alias = text_arg(args, "name"), text_arg(args, "alias")
    _model_row(store, name)
    rs.delete_alias(store, name, alias, principal.name)
    return reply({})
