"""The hook every autolog integration plugs into, and the helpers they share.

An integration is any object with a `name`, `is_available()`, `enable(config)` and
`disable()` (the `Integration` protocol). `register(integration)` makes it known to
`keel.autolog()`, which enables every registered integration whose library is
installed. A PyTorch Lightning integration, for example, would look like this:

    from keel.tracking.autolog import AutologConfig, register

    class LightningAutolog:
        name = "lightning"

        def is_available(self) -> bool:
            return importlib.util.find_spec("lightning") is not None

        def enable(self, config: AutologConfig) -> None:
            ...  # patch lightning.Trainer.__init__ to append a keel callback

        def disable(self) -> None:
            ...  # restore what enable() patched

    register(LightningAutolog())

The helpers below handle what every integration gets wrong once:

- `Patches` replaces attributes (methods, module functions) and restores exactly the
  originals, including attributes a class only inherited;
- `training()` is the shared "is a training call already in progress?" guard: only the
  outermost one is logged (a Pipeline's inner fits, cross-validation clones, or a
  LightGBM booster trained by a scikit-learn Pipeline are not separate records);
- `safely()` turns any failure while logging into a warning on the `keel.autolog`
  logger, so logging can never break the user's training code;
- `log_fitted_model()` saves a model into the current run with an input example.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from keel.errors import TrackingError

logger = logging.getLogger("keel.autolog")

#: How much of a param's text is kept: long reprs (a Pipeline's `steps`, an array)
#: are cut here, with a marker, so params stay readable in tables and diffs.
MAX_PARAM_CHARS = 500


@dataclass(frozen=True, slots=True)
class AutologConfig:
    """What `keel.autolog(...)` asked for; handed to every integration's `enable`."""

    log_models: bool = True
    log_input_examples: bool = False
    max_tuning_runs: int | None = 50


@runtime_checkable
class Integration(Protocol):
    """An autolog integration for one framework."""

    #: The framework's name, as passed in `keel.autolog(frameworks=[...])`.
    name: str

    def is_available(self) -> bool:
        """Whether the framework is installed (ideally without importing it)."""
        ...

    def enable(self, config: AutologConfig) -> None:
        """Start logging; called again with a new config when autolog is re-enabled."""
        ...

    def disable(self) -> None:
        """Stop logging and restore everything `enable` changed. Must be idempotent."""
        ...


_registry: dict[str, Integration] = {}
_registry_lock = threading.Lock()


def register(integration: Integration) -> Integration:
    """Make an integration known to `keel.autolog()` (replacing one of the same name)."""
    if not isinstance(integration, Integration):
        raise TrackingError(
            f"{integration!r} is not an autolog integration",
            hint="It needs a `name` and the methods is_available(), enable(config), disable()",
        )
    name = integration.name
    if not isinstance(name, str) or not name:
        raise TrackingError(f"an autolog integration needs a non-empty name, got {name!r}")
    with _registry_lock:
        previous = _registry.get(name)
        _registry[name] = integration
    if previous is not None and previous is not integration:
        previous.disable()
    return integration


def integrations() -> dict[str, Integration]:
    """The registered integrations by name."""
    with _registry_lock:
        return dict(_registry)


def module_available(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- patching --------------------------------------------------------------------------

_MISSING = object()


class Patches:
    """Attributes replaced on classes or modules, restorable to exactly what was there."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._saved)

    def replace(self, owner: object, name: str, wrap: Callable[[Any], Any]) -> bool:
        """Set `owner.name = wrap(original)`; False when there is nothing to wrap.

        The original is found through inheritance but unwrapped from an earlier
        patch, so that patching a class and its subclass never stacks wrappers.
        """
        own = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        current = getattr(owner, name, _MISSING)
        if current is _MISSING or not callable(current):
            return False
        target = own if own is not _MISSING else _inherited(owner, name)
        original = getattr(target, "__keel_original__", target)
        replacement = wrap(original)
        replacement.__keel_original__ = original
        with self._lock:
            self._saved.append((owner, name, own))
            setattr(owner, name, replacement)
        return True

    def restore(self) -> None:
        """Put every original back, newest patch first."""
        with self._lock:
            saved, self._saved = self._saved, []
        for owner, name, own in reversed(saved):
            if own is _MISSING:
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(owner, name)
            else:
                setattr(owner, name, own)


def _inherited(owner: object, name: str) -> object:
    if isinstance(owner, type):
        for base in owner.__mro__:
            if name in vars(base):
                return vars(base)[name]
    return getattr(owner, name)


def original(function: Any) -> Any:
    """The unpatched version of a function or method that autolog may have replaced."""
    return getattr(function, "__keel_original__", function)


# -- the "outermost training call" guard ----------------------------------------------


class PatchingIntegration:
    """The shared skeleton of an integration that patches a library: subclasses set
    `name` and `module` and implement `_install(config)` with `self._patches`."""

    name: str
    module: str

    def __init__(self) -> None:
        self._patches = Patches()
        self._lock = threading.Lock()
        self.config: AutologConfig | None = None

    def is_available(self) -> bool:
        return module_available(self.module)

    def enable(self, config: AutologConfig) -> None:
        with self._lock:
            self.config = config
            if not len(self._patches):  # patched once; a new config just replaces the old
                self._install(config)

    def disable(self) -> None:
        with self._lock:
            self.config = None
            self._patches.restore()

    def _install(self, config: AutologConfig) -> None:
        raise TypeError(f"{type(self).__name__} must define _install")


class _Depth(threading.local):
    value: int = 0


_depth = _Depth()
_active_lock = threading.Lock()
_active: dict[object, int] = {}


@contextlib.contextmanager
def nested_training() -> Iterator[None]:
    """Mark a block whose training calls are internal (never logged on their own)."""
    _depth.value += 1
    try:
        yield
    finally:
        _depth.value -= 1


@contextlib.contextmanager
def training() -> Iterator[bool]:
    """Enter a training call; yields True when it is the one to log.

    It is not when another training call encloses it on this thread (a Pipeline's
    steps, a search's refits), nor when it runs on a helper thread that belongs to no
    run while a logged training call is in progress (joblib's threading backend,
    a forest's parallel trees): such threads carry no run of their own, so their fits
    are the enclosing fit's internals, not a user's fit.
    """
    from keel.tracking.active import current

    outermost = _depth.value == 0
    run = None
    if outermost:
        try:
            run = current(start=False)
        except Exception as exc:  # the store is unreachable: record_for will warn
            logger.debug("keel autolog: no current run: %s", exc)
    key: object = (run.run_id, run.seq) if run is not None else None
    if outermost:
        with _active_lock:
            if (run is None and _active) or _active.get(key, 0) > 0:
                outermost = False
    if not outermost:
        with nested_training():
            yield False
        return
    with _active_lock:
        _active[key] = _active.get(key, 0) + 1
    _depth.value += 1
    try:
        yield True
    finally:
        _depth.value -= 1
        with _active_lock:
            left = _active[key] - 1
            if left:
                _active[key] = left
            else:
                del _active[key]


# -- which run a training call records into ------------------------------------------

_MAX_REMEMBERED = 10_000
_claimed_lock = threading.Lock()
# Tracked runs (per step attempt) that already hold a training call's record.
_claimed: OrderedDict[tuple[str, int, int], None] = OrderedDict()


def _claim(key: tuple[str, int, int]) -> bool:
    """True the first time a run (step attempt) is asked for: the call records into it."""
    with _claimed_lock:
        if key in _claimed:
            _claimed.move_to_end(key)
            return False
        _claimed[key] = None
        if len(_claimed) > _MAX_REMEMBERED:
            _claimed.popitem(last=False)
        return True


def record_for(name: str) -> AbstractContextManager[Any]:
    """Where a training call records: the current run for the first call made in it,
    else a nested run of its own named `name`, opened before training so that it
    times the training and fails with it. Use it around the original call."""
    from keel.sdk.context import current_step
    from keel.tracking.active import current

    try:
        run = current()
        assert run is not None
        step = current_step()
        attempt = step.attempt if step is not None and step.run_id == run.run_id else 0
        if _claim((run.run_id, run.seq, attempt)):
            return contextlib.nullcontext()
    except Exception as exc:
        logger.warning("keel autolog could not choose a run to record into: %s", exc)
        return contextlib.nullcontext()
    return _child_or_current(name)


@contextlib.contextmanager
def _child_or_current(name: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(child_run(name, {"autolog.trained": name}))
        except Exception as exc:
            logger.warning("keel autolog could not open a run for %s: %s", name, exc)
        yield


@contextlib.contextmanager
def child_run(name: str, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """A run nested under the current one, also when that is the run keel started on
    demand (outside any step, workflow or `start_run`)."""
    from keel.tracking import active

    auto = None
    if active.current(start=False) is None:
        # start_run nests under the innermost start_run, step or workflow body; the
        # on-demand run is none of those, so it is made the innermost for a moment.
        auto = active._auto_started()
        active._local.stack.append(auto)
    try:
        run = active.start_run(run_name=name, tags=tags)
    finally:
        if auto is not None:
            active._local.stack.remove(auto)
    _claim((run.id, -1, 0))
    try:
        yield run
    except BaseException as exc:
        with safely(f"end run {run.id}"):
            run.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with safely(f"end run {run.id}"):
        run.end()


# -- logging without breaking the user's code -----------------------------------------


@contextlib.contextmanager
def safely(what: str) -> Iterator[None]:
    """Run a logging block; a failure becomes a warning on the `keel.autolog` logger."""
    try:
        yield
    except Exception as exc:
        logger.warning("keel autolog could not %s: %s: %s", what, type(exc).__name__, exc)


def stringify(value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """A param's text: `str(value)`, cut to `limit` characters with a marker."""
    text = str(value)
    if len(text) > limit:
        cut = limit - 30
        text = f"{text[:cut]}... ({len(text) - cut} more chars)"
    return text


def log_params_safely(params: dict[str, Any]) -> None:
    """Log params one batch at a time; a value that cannot be logged is skipped with a
    warning, and the others are still logged."""
    from keel.tracking.log import log_params

    texts: dict[str, str] = {}
    for key, value in params.items():
        with safely(f"turn param {key!r} into text"):
            texts[str(key)] = stringify(value)
    try:
        log_params(texts)
    except Exception:
        for key, text in texts.items():
            with safely(f"log param {key!r}"):
                log_params({key: text})


def log_metrics_safely(metrics: dict[str, float], step: int | None = None) -> None:
    from keel.tracking.log import log_metrics

    with safely("log metrics " + ", ".join(sorted(metrics))):
        log_metrics(metrics, step=step)


def input_example(data: Any, rows: int = 5) -> Any:
    """The first `rows` rows of training input (array, DataFrame, sparse matrix, list)."""
    if data is None:
        return None
    iloc = getattr(data, "iloc", None)
    if iloc is not None:
        return iloc[:rows]
    try:
        return data[:rows]
    except Exception:
        return None


def log_fitted_model(
    model: Any, config: AutologConfig, example: Any, *, name: str = "model"
) -> str | None:
    """Save a fitted model into the current run with `keel.log_model`. Its signature is
    inferred from `example` (the first rows of the training input), which is itself
    stored only when `log_input_examples` is set. Returns the model's `runs:/` URI."""
    if not config.log_models:
        return None
    uri: str | None = None
    with safely(f"log the fitted {type(model).__name__} as {name!r}"):
        from keel.tracking.signature import infer_signature

        signature = None
        if example is not None:
            with safely("infer the model's signature from the training input"):
                signature = infer_signature(example)
        uri = _log_model()(
            model,
            name,
            signature=signature,
            input_example=example if config.log_input_examples else None,
        )
    return uri


def _log_model() -> Callable[..., str]:
    import importlib

    log_model: Callable[..., str] = importlib.import_module("keel.tracking.models").log_model
    return log_model
