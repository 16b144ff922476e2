"""`keel models ls | show | alias | history | lineage`: the model registry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from keel.cli.common import EXIT_USAGE, fail

if TYPE_CHECKING:
    from rich.tree import Tree

    from keel.tracking.lineage import DataArtifact, Lineage
    from keel.tracking.registry import ModelVersion

REF_HELP = "NAME/VERSION, NAME@ALIAS or NAME/latest"


@contextmanager
def _registry_errors() -> Iterator[None]:
    """An unknown model, version or alias, or a malformed reference, is bad input (2)."""
    from keel.errors import ModelRegistryError

    try:
        yield
    except ModelRegistryError as exc:
        fail(exc.message, hint=exc.hint, code=EXIT_USAGE)


def _split(ref: str) -> tuple[str, str | None]:
    """`name/3` -> (name, "3"); `name@champion` -> (name, "@champion"); `name` -> (name, None)."""
    text = ref.strip().removeprefix("models:/").strip("/")
    if "@" in text:
        name, alias = text.split("@", 1)
        return name, "@" + alias
    if "/" in text:
        name, version = text.split("/", 1)
        return name, version
    return text, None


def _version(ref: str) -> ModelVersion:
    from keel.tracking import registry

    name, version = _split(ref)
    if version is None:
        fail(f"{ref!r} names no version", hint=f"Give {REF_HELP}", code=EXIT_USAGE)
    return registry.get_version(name, version)


def ls(ctx: typer.Context) -> None:
    """List registered models: latest version, aliases, last change."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, when
    from keel.tracking import registry

    found = registry.list_models()
    out = console()
    if not found:
        out.print("no registered models (register one with keel.register_model)", markup=False)
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name in ("NAME", "LATEST", "VERSIONS", "ALIASES", "UPDATED", "DESCRIPTION"):
        table.add_column(name, no_wrap=name != "DESCRIPTION")
    for m in found:
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(m.aliases.items()))
        table.add_row(
            Text(m.name),
            str(m.latest_version or "-"),
            str(m.versions),
            Text(aliases or "-"),
            when(m.updated_at),
            Text((m.description or "").splitlines()[0] if m.description else ""),
        )
    out.print(table)


def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help=f"NAME (all versions), or {REF_HELP}")],
) -> None:
    """Show a model's versions, or one version: flavor, run, step, signature, tags."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, when
    from keel.tracking import registry

    out = console()
    name, version = _split(ref)
    with _registry_errors():
        if version is not None:
            _show_version(registry.get_version(name, version))
            return
        versions = registry.list_versions(name)
    about = next((m for m in registry.list_models() if m.name == name), None)
    out.print(Text(f"model {name}", style="bold"))
    if about is not None and about.description:
        out.print(Text(about.description))
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("VERSION", "FLAVOR", "ALIASES", "RUN", "STEP", "CREATED", "BY", "TAGS"):
        table.add_column(col, no_wrap=col != "TAGS")
    for v in versions:
        table.add_row(
            str(v.version),
            v.flavor,
            Text(", ".join(v.aliases) or "-"),
            Text(v.run_id or "-"),
            Text(v.step_key or "-"),
            when(v.created_at),
            Text(v.created_by or "-"),
            Text(", ".join(f"{k}={x}" for k, x in sorted(v.tags.items())) or ""),
        )
    out.print(table)


def _show_version(v: ModelVersion) -> None:
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, when

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    rows: list[tuple[str, str]] = [
        ("model", f"{v.name} version {v.version}"),
        ("uri", v.uri),
        ("flavor", v.flavor),
        ("aliases", ", ".join(v.aliases) or "-"),
        ("run", v.run_id or "-"),
        ("step", v.step_key or "-"),
        ("source", v.source_uri or "-"),
        ("created", f"{when(v.created_at)} by {v.created_by or '?'}"),
        ("description", v.description or "-"),
        ("signature", str(v.signature) if v.signature is not None else "-"),
        ("tags", ", ".join(f"{k}={x}" for k, x in sorted(v.tags.items())) or "-"),
    ]
    rows += [(k, str(x)) for k, x in sorted(v.meta.items()) if k.endswith("_version")]
    for key, value in rows:
        table.add_row(key, Text(value))
    console().print(table)


def alias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The registered model")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="e.g. champion")],
    version: Annotated[
        str | None, typer.Argument(help="The version to point at (a number, or another alias)")
    ] = None,
    delete: Annotated[bool, typer.Option("--delete", "-d", help="Remove the alias")] = False,
) -> None:
    """Point ALIAS at VERSION (moving it), or remove it with --delete. Audit-logged."""
    from keel.tracking import registry

    with _registry_errors():
        if delete:
            if version is not None:
                fail("--delete takes no VERSION", code=EXIT_USAGE)
            registry.delete_alias(name, alias_name)
            typer.echo(f"removed alias {alias_name} of model {name}")
            return
        if version is None:
            fail(
                "give the VERSION the alias should point at",
                hint=f"keel models alias {name} {alias_name} 3 (or --delete to remove it)",
                code=EXIT_USAGE,
            )
        moved = registry.set_alias(name, alias_name, version)
        last = registry.history(name)[-1]
    was = ""
    if last.previous_version == moved.version:
        was = " (unchanged)"
    elif last.previous_version is not None:
        was = f" (was {last.previous_version})"
    typer.echo(f"{name}@{alias_name} -> version {moved.version}{was}")


def history(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The registered model")],
) -> None:
    """The audit log of a model: every version, alias move, tag and description, who, when."""
    from rich.table import Table
    from rich.text import Text

    from keel.cli.display import console, when
    from keel.tracking import registry

    with _registry_errors():
        events = registry.history(name)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("WHEN", "WHO", "ACTION", "VERSION", "ALIAS", "PREVIOUS", "DETAIL"):
        table.add_column(col, no_wrap=col != "DETAIL")
    for e in events:
        table.add_row(
            when(e.at),
            Text(e.actor or "?"),
            e.action,
            str(e.version) if e.version is not None else "-",
            Text(e.alias or "-"),
            str(e.previous_version) if e.previous_version is not None else "-",
            Text(json.dumps(e.detail, sort_keys=True) if e.detail else ""),
        )
    console().print(table)


def lineage(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help=REF_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON")] = False,
) -> None:
    """Show what produced a version: run and step, params, metrics, and the upstream data."""
    from keel.cli.display import console
    from keel.tracking import registry

    with _registry_errors():
        v = _version(ref)
        found = registry.lineage(v.name, v.version)
    if as_json:
        typer.echo(json.dumps(found.to_dict(), indent=2, sort_keys=True, default=str))
        return
    console().print(lineage_tree(found))


def lineage_tree(found: Lineage) -> Tree:
    from rich.text import Text
    from rich.tree import Tree

    from keel.cli.display import size, status_text

    v = found.version
    head = Text(f"models:/{v.name}/{v.version}", style="bold")
    head.append(f"  {v.flavor}", style="cyan")
    if v.aliases:
        head.append(f"  @{', @'.join(v.aliases)}", style="magenta")
    tree = Tree(head)
    if found.run is None:
        tree.add(Text("registered from a live object outside any run: no lineage", style="dim"))
        return tree
    run = found.run
    label = Text(f"run {run.id} ")
    label.append(run.run_name or run.workflow, style="bold")
    label.append(" ")
    label.append_text(status_text(run.status))
    if found.experiment:
        label.append(f"  experiment {found.experiment}", style="dim")
    node = tree.add(label)
    _add_values(node, "params", found.params, _text)
    _add_values(node, "metrics", found.metrics, _number)
    if found.step is None:
        _add_logged(node, found.logged, size)
        return tree
    step = found.step
    label = Text(f"step {step.key} ", style="bold")
    label.append(f"({step.task}) ")
    label.append_text(status_text(step.status))
    snode = node.add(label)
    _add_values(snode, "params", found.step_params, _text)
    _add_values(snode, "metrics", found.step_metrics, _number)
    _add_logged(snode, found.logged, size)
    if not found.inputs:
        snode.add(Text("no upstream step outputs flowed into it", style="dim"))
        return tree
    by_key = {a.step_key: a for a in found.inputs}
    data = snode.add(Text("inputs (upstream step outputs)", style="bold"))
    shown: set[str] = set()
    direct = step.deps
    keys = [a.step_key for a in found.inputs if a.seq in direct]
    for key in keys:
        _add_artifact(data, by_key[key], by_key, shown)
    return tree


def _text(value: Any) -> str:
    from keel.cli.display import short_repr

    return value if isinstance(value, str) else short_repr(value)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _add_values(parent: Tree, title: str, values: dict[str, Any], fmt: Any) -> None:
    from rich.text import Text

    if not values:
        return
    node = parent.add(Text(title, style="bold"))
    for key in sorted(values):
        node.add(Text(f"{key} = {fmt(values[key])}"))


def _add_logged(parent: Tree, logged: list[Any], size: Any) -> None:
    from rich.text import Text

    if not logged:
        return
    node = parent.add(Text("logged artifacts", style="bold"))
    for item in logged:
        node.add(Text(f"{item.path}  {size(item.size)}  {item.hash[:12]}"))


def _add_artifact(
    parent: Tree, item: DataArtifact, by_key: dict[str, DataArtifact], shown: set[str]
) -> None:
    from rich.text import Text

    from keel.cli.display import size

    label = Text(f"{item.step_key} ", style="bold")
    label.append(f"({item.task}) ")
    if item.hash is None:
        label.append(f"no output ({item.status})", style="dim")
    else:
        label.append(f"{item.type or '?'}  {size(item.size)}  {item.hash[:12]}  {item.stored}")
    if item.step_key in shown:
        label.append("  (see above)", style="dim")
        parent.add(label)
        return
    shown.add(item.step_key)
    node = parent.add(label)
    for logged in item.logged:
        node.add(
            Text(f"logged {logged.path}  {size(logged.size)}  {logged.hash[:12]}", style="dim")
        )
    for key in item.inputs:
        if key in by_key:
            _add_artifact(node, by_key[key], by_key, shown)
