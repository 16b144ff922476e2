"""The `keel` command: the Typer app, its root options and the list of commands.

Command modules import only Typer and the standard library at module level; the
engine, the store and Rich load inside the command that runs.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from keel.cli import artifacts, cache, logs, running, runs
from keel.cli.common import Settings, report_error


class KeelGroup(TyperGroup):
    """Turns keel's errors into one `error:` line and an exit code, for every command."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            from typer._click.exceptions import ClickException

            if isinstance(exc, ClickException):
                raise  # usage errors: Typer prints them (exit 2)
            code = report_error(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None


def _group(name: str, help_text: str) -> typer.Typer:
    return typer.Typer(
        name=name, help=help_text, cls=KeelGroup, no_args_is_help=True, add_completion=False
    )


app = typer.Typer(
    cls=KeelGroup,
    help="keel: durable Python workflows. Run them, inspect them, resume them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from keel import __version__

        typer.echo(f"keel {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url",
            envvar="KEEL_DB_URL",
            metavar="URL",
            help="Metadata store: sqlite:///path.db or postgresql+psycopg://user@host/db "
            "(default: SQLite under KEEL_HOME, ~/.keel)",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print keel's version"
        ),
    ] = False,
) -> None:
    """keel: durable Python workflows. Run them, inspect them, resume them.

    Exit codes: 0 success; 1 the run failed or was cancelled, or the operation
    failed; 2 bad input (file, workflow, parameter, run id, database URL); 130 Ctrl-C.
    """
    ctx.obj = Settings(db_url=db_url or None)


app.command("run")(running.run)
app.command("resume")(running.resume)
app.command("retry")(running.retry)
app.command("cancel")(running.cancel)
app.command("logs")(logs.logs)

runs_app = _group("runs", "List and inspect recorded runs.")
runs_app.command("ls")(runs.ls)
runs_app.command("show")(runs.show)
app.add_typer(runs_app)

artifacts_app = _group("artifacts", "Read the outputs steps recorded.")
artifacts_app.command("ls")(artifacts.ls)
artifacts_app.command("get")(artifacts.get)
app.add_typer(artifacts_app)

cache_app = _group("cache", "Explain and clear the cross-run step cache.")
cache_app.command("explain")(cache.explain)
cache_app.command("clear")(cache.clear)
app.add_typer(cache_app)


def main() -> None:
    app(prog_name="keel")
