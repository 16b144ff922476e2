"""What every command shares: the root options, the store, exit codes, and how
errors reach the user (one `error:` line and a hint on stderr, never a traceback).
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from keel.client import Client
    from keel.store.metadata import MetadataStore

EXIT_OK = 0
EXIT_FAILED = 1  # the run failed or was cancelled, or the operation could not be done
EXIT_USAGE = 2  # bad input: unknown file, workflow, parameter, run id, database URL
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
EXIT_TERMINATED = 143  # SIGTERM (timeout, systemd, Docker, Kubernetes), as shells report it

# Errors that mean "what you asked for does not exist or is malformed", by class name
# so that classifying an error does not import anything.
_BAD_INPUT = frozenset(
    {
        "ConfigError",
        "StoreUnavailableError",
        "DefinitionError",
        "ParameterError",
        "RunNotFoundError",
        "StepNotFoundError",
    }
)


@dataclass
class Settings:
    """Options given to `keel` itself, before the command name."""

    db_url: str | None = None


class CommandError(Exception):
    """A command's own failure: shown as `error: message` plus the hint."""

    def __init__(self, message: str, *, hint: str | None = None, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def fail(message: str, *, hint: str | None = None, code: int = EXIT_FAILED) -> NoReturn:
    raise CommandError(message, hint=hint, code=code)


def settings(ctx: typer.Context) -> Settings:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, Settings) else Settings()


def open_store(ctx: typer.Context) -> MetadataStore:
    from keel.store.config import StoreConfig
    from keel.store.metadata import open_store as open_metadata_store

    return open_metadata_store(StoreConfig.from_env(db_url=settings(ctx).db_url))


def open_client(ctx: typer.Context) -> Client:
    from keel.client import Client

    return Client(store=open_store(ctx))


def make_cwd_importable() -> None:
    """`keel run pkg.flows:wf` finds `pkg` in the current folder, as `python -m` would.

    The `keel` script's own folder is first on sys.path instead, so without this a
    module reference (and the resume of a run started from one) would not import.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def describe_exception(exc: BaseException) -> str:
    """`Type: message` on one line, with the place for syntax errors."""
    if isinstance(exc, SyntaxError):
        where = f"{exc.filename}, line {exc.lineno}" if exc.filename else f"line {exc.lineno}"
        return f"SyntaxError: {exc.msg} ({where})"
    message = _first_line(str(exc))
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def _print_error(message: str, hint: str | None) -> None:
    typer.secho("error: ", fg=typer.colors.RED, bold=True, err=True, nl=False)
    typer.echo(message, err=True)
    if hint:
        typer.secho(f"hint: {hint}", fg=typer.colors.YELLOW, err=True)


def report_error(exc: Exception) -> int | None:
    """Show `exc` to the user and return the exit code; None if it is not ours to show."""
    from keel.errors import KeelError

    if isinstance(exc, CommandError):
        _print_error(exc.message, exc.hint)
        return exc.code
    if isinstance(exc, KeelError):
        where = [f"run {exc.run_id}"] if exc.run_id else []
        if exc.step_key:
            where.append(f"step {exc.step_key}")
        text = exc.message + (f" ({', '.join(where)})" if where else "")
        _print_error(text, exc.hint)
        return EXIT_USAGE if type(exc).__name__ in _BAD_INPUT else EXIT_FAILED
    if type(exc).__module__.startswith("sqlalchemy"):
        orig = getattr(exc, "orig", None)
        detail = _first_line(str(orig if orig is not None else exc))
        _print_error(
            f"the metadata store failed: {type(exc).__name__}: {detail}",
            "Check that the database is reachable and KEEL_DB_URL / --db-url is right",
        )
        return EXIT_FAILED
    if isinstance(exc, OSError):
        if exc.errno == errno.EPIPE:
            return None  # `keel runs ls | head`: Typer quietly handles a closed pipe
        target = f": {exc.filename}" if exc.filename else ""
        _print_error(f"{exc.strerror or describe_exception(exc)}{target}", None)
        return EXIT_FAILED
    if os.environ.get("KEEL_DEBUG"):
        return None  # let the traceback through for whoever debugs keel itself
    _print_error(
        f"unexpected {describe_exception(exc)}",
        "This is a bug in keel; set KEEL_DEBUG=1 to see the traceback and report it",
    )
    return EXIT_FAILED
