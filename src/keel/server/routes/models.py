"""The model registry: models, versions, aliases (changed by admins), lineage and
the history of changes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from keel.server.routes.common import AUTH, ERRORS, Admin, Store, Viewer, loads
from keel.server.routes.metrics import Number, number
from keel.store import registry_store as rs
from keel.store.metadata import MetadataStore

router = APIRouter(tags=["models"], dependencies=AUTH, responses=ERRORS)

Name = Annotated[str, Path(max_length=250, description="The registered model's name")]
VersionRef = Annotated[
    str, Path(max_length=250, description="A version number, an alias, or 'latest'")
]


class ModelOut(BaseModel):
    name: str
    description: str | None
    tags: dict[str, str]
    latest_version: int | None
    versions: int
    aliases: dict[str, int]
    created_at: float
    updated_at: float


class VersionOut(BaseModel):
    name: str
    version: int
    flavor: str
    status: str
    run_id: str | None
    seq: int | None
    step_key: str | None
    aliases: list[str]
    tags: dict[str, str]
    description: str | None
    signature: dict[str, Any] | None
    meta: dict[str, Any]
    source_uri: str | None
    source_hash: str | None
    created_at: float
    created_by: str | None
    uri: str


class ModelDetail(ModelOut):
    version_list: list[VersionOut]


class AliasIn(BaseModel):
    version: int = Field(ge=1, le=2**31 - 1)


class AliasOut(BaseModel):
    name: str
    alias: str
    version: int | None
    previous_version: int | None


class EventOut(BaseModel):
    id: int
    name: str
    action: str
    version: int | None
    alias: str | None
    previous_version: int | None
    detail: dict[str, Any]
    actor: str | None
    at: float


class LineageStep(BaseModel):
    key: str
    task: str
    status: str


class LineageRun(BaseModel):
    id: str
    workflow: str
    status: str
    experiment: str | None


class LineageInput(BaseModel):
    step: str
    task: str
    hash: str | None
    type: str | None
    size: int | None
    stored: str | None
    inputs: list[str]
    logged: list[str]


class LoggedFile(BaseModel):
    path: str
    hash: str
    size: int


class LineageOut(BaseModel):
    model: dict[str, Any]
    run: LineageRun | None
    step: LineageStep | None
    params: dict[str, Any]
    metrics: dict[str, Number]
    step_params: dict[str, str]
    step_metrics: dict[str, Number]
    inputs: list[LineageInput]
    logged: list[LoggedFile]


def _model(store: MetadataStore, row: Any) -> ModelOut:
    numbers = rs.version_numbers(store, row.name)
    return ModelOut(
        name=row.name,
        description=row.description,
        tags={str(k): str(v) for k, v in loads(row.tags, {}).items()},
        latest_version=numbers[-1] if numbers else None,
        versions=len(numbers),
        aliases=rs.aliases(store, row.name),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _version(row: Any, named: dict[str, int], keys: dict[tuple[str, int], str]) -> VersionOut:
    return VersionOut(
        name=row.name,
        version=int(row.version),
        flavor=row.flavor,
        status=row.status,
        run_id=row.run_id,
        seq=row.seq,
        step_key=keys.get((row.run_id, row.seq)) if row.seq is not None else None,
        aliases=sorted(a for a, v in named.items() if v == row.version),
        tags={str(k): str(v) for k, v in loads(row.tags, {}).items()},
        description=row.description,
        signature=loads(row.signature, None),
        meta=loads(row.meta, {}),
        source_uri=row.source_uri,
        source_hash=row.source_hash,
        created_at=row.created_at,
        created_by=row.created_by,
        uri=f"models:/{row.name}/{row.version}",
    )


def _model_row(store: MetadataStore, name: str) -> Any:
    from keel.tracking.models import check_name

    check_name(name)
    row = rs.get_model(store, name)
    if row is None:
        raise rs.no_model(store, name)
    return row


def _versions(store: MetadataStore, name: str) -> list[VersionOut]:
    rows = rs.list_versions(store, name)
    keys = rs.step_keys(store, {(r.run_id, r.seq) for r in rows if r.run_id and r.seq is not None})
    named = rs.aliases(store, name)
    return [_version(r, named, keys) for r in rows]


@router.get("/models", response_model=list[ModelOut])
def list_models(_: Viewer, store: Store) -> list[ModelOut]:
    """Every registered model, by name."""
    return [_model(store, row) for row in rs.list_models(store)]


@router.get("/models/{name}", response_model=ModelDetail)
def get_model(name: Name, _: Viewer, store: Store) -> ModelDetail:
    """A model with its versions (oldest first) and aliases."""
    row = _model_row(store, name)
    return ModelDetail(**_model(store, row).model_dump(), version_list=_versions(store, name))


@router.get("/models/{name}/versions", response_model=list[VersionOut])
def list_versions(name: Name, _: Viewer, store: Store) -> list[VersionOut]:
    _model_row(store, name)
    return _versions(store, name)


def _number(store: MetadataStore, name: str, ref: str) -> int:
    from keel.tracking.registry import version_number as resolve

    _model_row(store, name)
    return resolve(store, name, ref)


@router.get("/models/{name}/versions/{version}", response_model=VersionOut)
def get_version(name: Name, version: VersionRef, _: Viewer, store: Store) -> VersionOut:
    """A version by number, alias (`champion` or `@champion`) or `latest`."""
    number_ = _number(store, name, version)
    row = rs.get_version(store, name, number_)
    keys = rs.step_keys(store, {(row.run_id, row.seq)} if row and row.run_id else set())
    return _version(row, rs.aliases(store, name), keys)


@router.put("/models/{name}/aliases/{alias}", response_model=AliasOut)
def set_alias(
    name: Name,
    alias: Annotated[str, Path(max_length=250)],
    body: AliasIn,
    principal: Admin,
    store: Store,
) -> AliasOut:
    """Point an alias at a version (moving it if it exists). Admins only; recorded in
    the model's history with the caller's token name."""
    from keel.tracking.registry import checked_alias

    _model_row(store, name)
    clean = checked_alias(alias)
    previous = rs.set_alias(store, name, clean, body.version, principal.name)
    return AliasOut(name=name, alias=clean, version=body.version, previous_version=previous)


@router.delete("/models/{name}/aliases/{alias}", response_model=AliasOut)
def delete_alias(
    name: Name, alias: Annotated[str, Path(max_length=250)], principal: Admin, store: Store
) -> AliasOut:
    """Remove an alias (the version stays). Admins only."""
    from keel.tracking.models import check_name

    _model_row(store, name)
    clean = check_name(alias, "alias")
    previous = rs.delete_alias(store, name, clean, principal.name)
    return AliasOut(name=name, alias=clean, version=None, previous_version=previous)


@router.get("/models/{name}/history", response_model=list[EventOut])
def model_history(name: Name, _: Viewer, store: Store) -> list[EventOut]:
    """Every change to the model, oldest first: versions, aliases, tags, descriptions."""
    _model_row(store, name)
    return [
        EventOut(
            id=r.id,
            name=r.name,
            action=r.action,
            version=r.version,
            alias=r.alias,
            previous_version=r.previous_version,
            detail=loads(r.detail, {}),
            actor=r.actor,
            at=r.at,
        )
        for r in rs.events(store, name)
    ]


@router.get("/models/{name}/versions/{version}/lineage", response_model=LineageOut)
def version_lineage(name: Name, version: VersionRef, _: Viewer, store: Store) -> LineageOut:
    """What produced a version: its run and step, their params and metrics, and the
    upstream step outputs (the data) that flowed into the step."""
    from keel.tracking.lineage import build_lineage
    from keel.tracking.registry import model_version_of

    number_ = _number(store, name, version)
    row = rs.get_version(store, name, number_)
    found = build_lineage(store, model_version_of(store, row)).to_dict()
    return LineageOut(
        model=found["model"],
        run=found["run"],
        step=found["step"],
        params=found["params"],
        metrics={k: number(v) for k, v in found["metrics"].items()},
        step_params=found["step_params"],
        step_metrics={k: number(v) for k, v in found["step_metrics"].items()},
        inputs=found["inputs"],
        logged=found["logged"],
    )
