"""Find a workflow from a reference: `path/to/file.py:name` or `package.module:name`."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from keel.errors import DefinitionError
from keel.sdk.definitions import Workflow


def module_from_file(path: Path) -> Any:
    resolved = path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    name = f"keel_user_{resolved.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise DefinitionError(f"cannot load {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    module.__keel_path__ = str(resolved)  # type: ignore[attr-defined]
    # Like running a script: its folder is importable, so sibling modules work.
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    try:
        import cloudpickle

        # The module is not importable by name elsewhere: ship its code by value.
        cloudpickle.register_pickle_by_value(module)
    except (ImportError, ValueError):
        pass
    return module


def load_workflow(ref: str) -> Workflow[Any, Any]:
    """Load a workflow; errors say what was wrong with the reference and what exists."""
    target, sep, attr = ref.rpartition(":")
    if not sep or not target or not attr:
        raise DefinitionError(
            f"{ref!r} does not name a workflow",
            hint="Use path/to/file.py:workflow_name or package.module:workflow_name",
        )
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise DefinitionError(
                f"no such file: {target}", hint="Check the path (relative to the current folder)"
            )
        module = module_from_file(path)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise DefinitionError(
                f"cannot import module {target!r}: {exc}",
                hint="Check the module name and that it is on the Python path, "
                "or give a file path such as flows/train.py:wf",
            ) from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if isinstance(obj, Workflow):
        return obj
    found = sorted(name for name, v in vars(module).items() if isinstance(v, Workflow))
    what = "is not a workflow" if obj is not None else "does not exist"
    raise DefinitionError(
        f"{attr!r} in {target} {what}",
        hint=f"Workflows there: {', '.join(found)}" if found else "No @keel.workflow found there",
    )
