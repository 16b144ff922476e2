"""The model registry: `keel.register_model` and the `keel.models` namespace.

A registered model is a name with numbered versions (1, 2, ...). Each version
points at a model's bytes in the artifact store, its flavor and signature, and the
run and step that produced it. Aliases (`champion`, `staging`) name versions and
move; every change is recorded in an audit log with who (`KEEL_USER`, else the
login name) and when: `keel.models.history(name)`.

A version is immutable: registering copies its files into the artifact store's pinned
area, by content hash, and loading reads only those copies (see keel.tracking.pins).

`keel.models` is this module: `keel.models.set_alias("digits", "champion", 3)`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from keel.errors import ModelNotFoundError, ModelRegistryError
from keel.store import registry_store as rs
from keel.store.limits import check_text
from keel.tracking.models import (
    URI_FORMS,
    LoadedModel,
    ModelSource,
    check_name,
    load_source,
    resolve_signature,
    source_from_runs_uri,
    source_from_step,
)
from keel.tracking.pins import pin_source
from keel.tracking.signature import Signature

if TYPE_CHECKING:
    from keel.store.metadata import MetadataStore
    from keel.tracking.lineage import Lineage

__all__ = [
    "ModelVersion",
    "RegisteredModel",
    "RegistryEvent",
    "register_model",
    "get_version",
    "list_models",
    "list_versions",
    "set_alias",
    "delete_alias",
    "set_version_tag",
    "delete_version_tag",
    "set_description",
    "history",
    "lineage",
]

RESERVED_ALIASES = frozenset({"latest"})


def actor() -> str:
    """Who is making a change: `KEEL_USER`, else the login name."""
    user = os.environ.get("KEEL_USER")
    if user:
        return user[:100]
    try:
        return getpass.getuser()[:100]
    except Exception:
        return "unknown"


def registry_store() -> MetadataStore:
    """The store of the current tracked run, else the default one (KEEL_DB_URL / KEEL_HOME)."""
    from keel.store.metadata import open_store
    from keel.tracking.active import current, unrecorded_store

    run = current(start=False)
    if run is not None:
        return run.store
    return unrecorded_store() or open_store()


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    flavor: str
    run_id: str | None
    step_key: str | None
    seq: int | None
    signature: Signature | None
    tags: dict[str, str]
    description: str | None
    created_at: datetime
    created_by: str | None
    aliases: tuple[str, ...]
    source_uri: str | None
    source_hash: str | None
    meta: dict[str, Any]
    status: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def load(self) -> LoadedModel:
        from keel.tracking.models import load_model

        return load_model(self.uri)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str | None
    latest_version: int | None
    versions: int
    aliases: dict[str, int]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class RegistryEvent:
    """One change in the audit log: `action` is create_version, set_alias,
    delete_alias, set_version_tag, delete_version_tag or set_description."""

    name: str
    action: str
    version: int | None
    alias: str | None
    previous_version: int | None
    detail: dict[str, Any]
    actor: str | None
    at: datetime


def model_version_of(
    store: MetadataStore, row: Any, keys: dict[tuple[str, int], str] | None = None
) -> ModelVersion:
    if keys is None:
        keys = rs.step_keys(
            store, {(row.run_id, row.seq)} if row.run_id and row.seq is not None else set()
        )
    named = sorted(a for a, v in rs.aliases(store, row.name).items() if v == row.version)
    return ModelVersion(
        name=row.name,
        version=int(row.version),
        flavor=row.flavor,
        run_id=row.run_id,
        step_key=keys.get((row.run_id, row.seq)) if row.seq is not None else None,
        seq=row.seq,
        signature=Signature.from_dict(json.loads(row.signature)) if row.signature else None,
        tags=json.loads(row.tags) if row.tags else {},
        description=row.description,
        created_at=_when(row.created_at) or datetime.now(UTC),
        created_by=row.created_by,
        aliases=tuple(named),
        source_uri=row.source_uri,
        source_hash=row.source_hash,
        meta=json.loads(row.meta) if row.meta else {},
        status=row.status,
    )


# -- versions by number, alias or 'latest' -------------------------------------------------


def version_number(store: MetadataStore, name: str, ref: Any) -> int:
    """The version number `ref` names: 3, "3", "latest", "@champion" or "champion"."""
    check_name(name)
    if rs.get_model(store, name) is None:
        raise rs.no_model(store, name)
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise ModelRegistryError(
            f"a version is a number or an alias, got {ref!r}", hint="e.g. 3 or 'champion'"
        )
    if isinstance(ref, int) or ref.isdigit():
        number = int(ref)
        if number < 1 or rs.get_version(store, name, number) is None:
            raise rs.no_version(store, name, number)
        return number
    if ref == "latest":
        numbers = rs.version_numbers(store, name)
        if not numbers:
            raise rs.no_version(store, name, 1)
        return numbers[-1]
    alias = check_name(ref.removeprefix("@"), "alias")
    target = rs.alias_version(store, name, alias)
    if target is None:
        raise rs.no_alias(store, name, alias)
    if rs.get_version(store, name, target) is None:
        raise ModelNotFoundError(
            f"alias {alias!r} of model {name!r} points at version {target}, which does not exist",
            hint=f"Point it at an existing version: keel.models.set_alias({name!r}, {alias!r}, N)",
        )
    return target


def version_source(store: MetadataStore, name: str, ref: Any) -> ModelSource:
    row = rs.get_version(store, name, version_number(store, name, ref))
    assert row is not None
    return ModelSource(
        flavor=row.flavor,
        source_hash=row.source_hash,
        meta=json.loads(row.meta) if row.meta else {},
        signature=Signature.from_dict(json.loads(row.signature)) if row.signature else None,
        run_id=row.run_id,
        seq=row.seq,
        uri=row.source_uri,
    )


# -- registering ---------------------------------------------------------------------------


def register_model(
    name: str,
    model_or_uri_or_step: Any,
    *,
    flavor: str | None = None,
    signature: Any = None,
    input_example: Any = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Register a new version of model `name` (created on first use) and return it.

    The model is a live object (saved with its flavor into the current tracked run,
    if any), a `runs:/` URI from `keel.log_model` or naming a step's output, a
    `models:/` URI (another registered version), or a `keel.Step` whose output is
    the model. Versions count up from 1 per name, also under concurrent registration.
    """
    from keel.client import Step

    check_name(name)
    clean_tags = _check_tags(tags)
    if description is not None and not isinstance(description, str):
        raise ModelRegistryError(f"description must be a string, got {type(description).__name__}")
    if description is not None:
        check_text("description", description, field="description")
    source_arg = model_or_uri_or_step
    store = source_arg._store if isinstance(source_arg, Step) else registry_store()
    source = _source(store, name, source_arg, flavor, signature, input_example)
    # A version never changes: its files are copied and loaded by content hash, so a
    # run's files changed after this call change nothing it loads.
    source = pin_source(store, source)
    values = {
        "name": name,
        "flavor": source.flavor,
        "source_hash": source.source_hash,
        "source_uri": source.uri,
        "signature": json.dumps(source.signature.to_dict()) if source.signature else None,
        "meta": json.dumps(source.meta, sort_keys=True, default=str),
        "run_id": source.run_id,
        "seq": source.seq,
        "description": description,
        "tags": json.dumps(clean_tags, sort_keys=True) if clean_tags else None,
        "status": "READY",
    }
    version = rs.create_version(store, values, actor())
    row = rs.get_version(store, name, version)
    return model_version_of(store, row)


def _source(
    store: MetadataStore, name: str, given: Any, flavor: str | None, signature: Any, example: Any
) -> ModelSource:
    from keel.client import Step
    from keel.tracking.flavors import flavor_for

    if isinstance(given, ModelVersion):
        given = given.uri
    if isinstance(given, str):
        text = given.strip()
        if text.startswith("models:/"):
            from keel.tracking.models import parse_models_uri

            source = version_source(store, *parse_models_uri(text))
            source = ModelSource(**{**source.__dict__, "uri": source.uri or text})
        elif text.startswith("runs:/"):
            source = source_from_runs_uri(store, text)
        else:
            raise ModelRegistryError(
                f"cannot register {given[:80]!r}: a string must be a model URI",
                hint=f"Pass a model object, a keel.Step, or one of {URI_FORMS}",
            )
    elif isinstance(given, Step):
        source = source_from_step(store, given)
    else:
        chosen = flavor_for(given, flavor)
        sig = resolve_signature(given, signature, example)
        return _live_source(store, name, given, chosen.name, sig)
    return _adjust(store, source, flavor, signature, example)


def _adjust(
    store: MetadataStore, source: ModelSource, flavor: str | None, signature: Any, example: Any
) -> ModelSource:
    """A stored model with the flavor and signature the caller asked for."""
    changes: dict[str, Any] = {}
    if signature is not None or example is not None:
        changes["signature"] = resolve_signature(None, signature, example)
    if flavor is not None and flavor != source.flavor:
        live = source.live if source.live is not None else _load_raw(store, source)
        if flavor == "onnx" or source.meta.get("format") != "step-output":
            sig = changes.get("signature", source.signature)
            return _saved_source(store, live, flavor, sig, source)
        from keel.tracking.flavors import flavor_for

        changes["flavor"] = flavor_for(live, flavor).name
    return ModelSource(**{**source.__dict__, **changes}) if changes else source


def _load_raw(store: MetadataStore, source: ModelSource) -> Any:
    return load_source(store, source, source.uri or "").unwrap()


def _saved_source(
    store: MetadataStore, model: Any, flavor: str, sig: Signature | None, origin: ModelSource
) -> ModelSource:
    from keel.store.artifacts import artifact_store
    from keel.tracking.flavors import flavor_for

    chosen = flavor_for(model, flavor)
    saved = chosen.save(model, sig)
    digest = hashlib.sha256(saved.data).hexdigest()
    artifact_store(store.config.artifacts_url).put(digest, saved.data)
    return ModelSource(
        flavor=chosen.name,
        source_hash=digest,
        meta={**saved.meta, "file": saved.file},
        signature=sig,
        run_id=origin.run_id,
        seq=origin.seq,
        uri=origin.uri,
    )


def _live_source(
    store: MetadataStore, name: str, model: Any, flavor: str, sig: Signature | None
) -> ModelSource:
    """A live model: linked to the step that returned it when a workflow body registers a
    step's output; else logged into the current tracked run; else just stored."""
    from keel.tracking.active import current
    from keel.tracking.models import log_model

    run = current(start=False)  # a run opened by start_run, a step or a workflow body
    if run is None:
        return _saved_source(store, model, flavor, sig, ModelSource(flavor, "", {}, sig))
    if run.seq < 0:
        step = _step_that_returned(run, model)
        if step is not None:
            found = source_from_step(run.store, step)
            if found.flavor == flavor:
                return ModelSource(**{**found.__dict__, "signature": sig or found.signature})
    uri = log_model(model, name, flavor=flavor, signature=sig)
    return source_from_runs_uri(run.store, uri)


def _step_that_returned(run: Any, model: Any) -> Any:
    """The step of `run` whose recorded output is byte-identical to `model`, if any."""
    from keel.client import Client
    from keel.store.serializers import encode, type_name
    from keel.store.values import content_digest

    run.recorder.flush()
    wanted = type_name(model)
    try:
        steps = [
            s for s in Client(store=run.store).run(run.run_id).steps if s.output_type == wanted
        ]
    except Exception:
        return None
    if not steps:
        return None
    try:
        enc = encode(model)
    except Exception:
        return None
    digest = content_digest(enc.serializer, enc.data)
    return next((s for s in reversed(steps) if s.output_hash == digest), None)


def _check_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    from keel.store.tracking import MAX_KEY_LENGTH, MAX_TAG_LENGTH

    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise ModelRegistryError(f"tags must be a dict, got {type(tags).__name__}")
    out = {}
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ModelRegistryError(
                f"tag key {key!r} must be a string of 1 to {MAX_KEY_LENGTH} characters"
            )
        text = str(value)
        if len(text) > MAX_TAG_LENGTH:
            raise ModelRegistryError(
                f"tag {key!r} is {len(text)} characters long; the limit is {MAX_TAG_LENGTH}"
            )
        out[key] = text
    return out


# -- reading -------------------------------------------------------------------------------


def get_version(name: str, version: int | str = "latest") -> ModelVersion:
    """A version by number, alias ('champion' or '@champion') or 'latest'."""
    store = registry_store()
    row = rs.get_version(store, name, version_number(store, name, version))
    return model_version_of(store, row)


def list_versions(name: str) -> list[ModelVersion]:
    """Every version of a model, oldest first."""
    store = registry_store()
    check_name(name)
    if rs.get_model(store, name) is None:
        raise rs.no_model(store, name)
    rows = rs.list_versions(store, name)
    keys = rs.step_keys(store, {(r.run_id, r.seq) for r in rows if r.run_id and r.seq is not None})
    return [model_version_of(store, r, keys) for r in rows]


def list_models() -> list[RegisteredModel]:
    """Every registered model, by name."""
    store = registry_store()
    numbers: dict[str, list[int]] = {}
    for row in rs.list_versions(store):
        numbers.setdefault(row.name, []).append(int(row.version))
    named = rs.aliases(store)
    out = []
    for row in rs.list_models(store):
        versions = numbers.get(row.name, [])
        out.append(
            RegisteredModel(
                name=row.name,
                description=row.description,
                latest_version=max(versions) if versions else None,
                versions=len(versions),
                aliases={
                    key.split("/", 1)[1]: v
                    for key, v in named.items()
                    if key.split("/", 1)[0] == row.name
                },
                created_at=_when(row.created_at) or datetime.now(UTC),
                updated_at=_when(row.updated_at) or datetime.now(UTC),
            )
        )
    return out


def history(name: str) -> list[RegistryEvent]:
    """The audit log of a model, oldest first: who changed what, when."""
    store = registry_store()
    check_name(name)
    if rs.get_model(store, name) is None:
        raise rs.no_model(store, name)
    return [
        RegistryEvent(
            name=r.name,
            action=r.action,
            version=r.version,
            alias=r.alias,
            previous_version=r.previous_version,
            detail=json.loads(r.detail) if r.detail else {},
            actor=r.actor,
            at=_when(r.at) or datetime.now(UTC),
        )
        for r in rs.events(store, name)
    ]


def lineage(name: str, version: int | str = "latest") -> Lineage:
    """What produced a version: its run and step, the run's params and metrics, and the
    data that flowed into the step (upstream step outputs, with hashes and sizes)."""
    from keel.tracking.lineage import build_lineage

    return build_lineage(registry_store(), get_version(name, version))


# -- changing ------------------------------------------------------------------------------


def checked_alias(alias: Any) -> str:
    check_name(alias, "alias")
    if alias in RESERVED_ALIASES or alias.isdigit():
        raise ModelRegistryError(
            f"{alias!r} cannot be an alias",
            hint="'latest' always means the newest version, and numbers are versions: "
            "pick a name such as 'champion'",
        )
    return str(alias)


def set_alias(name: str, alias: str, version: int | str) -> ModelVersion:
    """Point `alias` at `version` (moving it if it exists); recorded in the audit log."""
    store = registry_store()
    alias = checked_alias(alias)
    number = version_number(store, name, version)
    rs.set_alias(store, name, alias, number, actor())
    return get_version(name, number)


def delete_alias(name: str, alias: str) -> None:
    """Remove an alias (the versions stay); recorded in the audit log."""
    store = registry_store()
    check_name(name)
    alias = check_name(alias, "alias")
    rs.delete_alias(store, name, alias, actor())


def set_version_tag(name: str, version: int | str, key: str, value: Any) -> None:
    """Set a tag on one version (a later value replaces an earlier one)."""
    store = registry_store()
    number = version_number(store, name, version)
    tag = _check_tags({key: value})

    def change(row: Any) -> dict[str, Any]:
        current = json.loads(row.tags) if row.tags else {}
        return {"tags": json.dumps({**current, **tag}, sort_keys=True)}

    rs.update_version(
        store, name, number, actor(), action="set_version_tag", detail=tag, change=change
    )


def delete_version_tag(name: str, version: int | str, key: str) -> None:
    store = registry_store()
    number = version_number(store, name, version)
    row = rs.get_version(store, name, number)
    current = json.loads(row.tags) if row is not None and row.tags else {}
    if key not in current:
        raise ModelNotFoundError(
            f"version {number} of model {name!r} has no tag {key!r}",
            hint=f"Its tags: {', '.join(current)}" if current else "It has no tags",
        )

    def change(row: Any) -> dict[str, Any]:
        tags = {k: v for k, v in (json.loads(row.tags) if row.tags else {}).items() if k != key}
        return {"tags": json.dumps(tags, sort_keys=True) if tags else None}

    rs.update_version(
        store, name, number, actor(), action="delete_version_tag", detail={"key": key},
        change=change,
    )  # fmt: skip


def set_description(name: str, description: str | None, version: int | str | None = None) -> None:
    """Describe a model, or one version of it when `version` is given."""
    store = registry_store()
    if description is not None and not isinstance(description, str):
        raise ModelRegistryError(f"description must be a string, got {type(description).__name__}")
    if description is not None:
        check_text("description", description, field="description")
    if version is None:
        check_name(name)
        rs.set_model_description(store, name, description, actor())
        return
    number = version_number(store, name, version)
    rs.update_version(
        store, name, number, actor(), action="set_description",
        detail={"description": description}, change=lambda _row: {"description": description},
    )  # fmt: skip


# `keel.models` is this module itself.
models = sys.modules[__name__]
