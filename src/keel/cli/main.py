"""The `keel` command: the Typer app, its root options and the list of commands.

Command modules import only Typer and the standard library at module level; the
engine, the store and Rich load inside the command that runs.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from keel.cli import (
    artifacts,
    cache,
    logs,
    models_cmds,
    predict_cmds,
    running,
    runs,
    schedule_cmds,
    serve_cmds,
    server_cmds,
    tracking_cmds,
    worker_cmds,
)
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
    epilog="Exit codes: 0 success; 1 the run failed or was cancelled, or the operation "
    "failed; 2 bad input (file, workflow, parameter, run id, database URL); 130 Ctrl-C; "
    "143 SIGTERM (the run is recorded as CANCELLED and can be resumed). "
    "Docs: docs/cli.md",
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
    """Options that apply to every command."""
    ctx.obj = Settings(db_url=db_url or None)
    if db_url and os.environ.get("KEEL_DB_URL") != db_url:
        # Code that opens the default store by itself (process-pool workers, tracking
        # calls inside tasks) must see the same store as the command.
        previous = os.environ.get("KEEL_DB_URL")
        os.environ["KEEL_DB_URL"] = db_url
        ctx.call_on_close(lambda: _restore_env("KEEL_DB_URL", previous))


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


app.command("run")(running.run)
app.command("resume")(running.resume)
app.command("retry")(running.retry)
app.command("cancel")(running.cancel)
app.command("logs")(logs.logs)

runs_app = _group("runs", "List and inspect recorded runs.")
runs_app.command("ls")(runs.ls)
runs_app.command("show")(runs.show)
runs_app.command("compare")(tracking_cmds.compare)
app.add_typer(runs_app)

experiments_app = _group("experiments", "List the experiments tracked runs belong to.")
experiments_app.command("ls")(tracking_cmds.experiments_ls)
app.add_typer(experiments_app)

artifacts_app = _group("artifacts", "Read the outputs steps recorded.")
artifacts_app.command("ls")(artifacts.ls)
artifacts_app.command("get")(artifacts.get)
app.add_typer(artifacts_app)

cache_app = _group("cache", "Explain and clear the cross-run step cache.")
cache_app.command("explain")(cache.explain)
cache_app.command("clear")(cache.clear)
app.add_typer(cache_app)

models_app = _group("models", "The model registry: versions, aliases, audit log, lineage.")
models_app.command("ls")(models_cmds.ls)
models_app.command("show")(models_cmds.show)
models_app.command("alias")(models_cmds.alias)
models_app.command("history")(models_cmds.history)
models_app.command("lineage")(models_cmds.lineage)
app.add_typer(models_app)

app.command("worker")(worker_cmds.worker)
app.command("signal")(worker_cmds.signal)
pools_app = _group("pools", "Pools cap how many steps of a kind run at once across workers.")
pools_app.command("set")(worker_cmds.pools_set)
pools_app.command("ls")(worker_cmds.pools_ls)
app.add_typer(pools_app)
workers_app = _group("workers", "The `keel worker` processes sharing the queues.")
workers_app.command("ls")(worker_cmds.workers_ls)
app.add_typer(workers_app)

schedules_app = _group("schedules", "Run workflows on a cron or an interval.")
schedules_app.command("add")(schedule_cmds.add)
schedules_app.command("ls")(schedule_cmds.ls)
schedules_app.command("show")(schedule_cmds.show)
schedules_app.command("pause")(schedule_cmds.pause)
schedules_app.command("resume")(schedule_cmds.resume)
schedules_app.command("rm")(schedule_cmds.rm)
schedules_app.command("sync")(schedule_cmds.sync)
app.add_typer(schedules_app)
app.command("backfill")(schedule_cmds.backfill)
triggers_app = _group("triggers", "Start workflows when runs end, aliases move, files arrive.")
triggers_app.command("add")(schedule_cmds.triggers_add)
triggers_app.command("ls")(schedule_cmds.triggers_ls)
triggers_app.command("events")(schedule_cmds.triggers_events)
triggers_app.command("rm")(schedule_cmds.triggers_rm)
triggers_app.command("fire")(schedule_cmds.triggers_fire)
app.add_typer(triggers_app)
app.command("scheduler")(schedule_cmds.scheduler)

app.command("predict")(predict_cmds.predict)
app.command("server")(server_cmds.server)
app.command("ui")(server_cmds.ui)
token_app = _group("token", "API tokens for keel server: viewer, operator or admin.")
token_app.command("create")(server_cmds.token_create)
token_app.command("ls")(server_cmds.token_ls)
token_app.command("revoke")(server_cmds.token_revoke)
app.add_typer(token_app)

app.command("serve")(serve_cmds.serve)
deployments_app = _group("deployments", "The servers `keel serve` runs: what, where, since when.")
deployments_app.command("ls")(serve_cmds.deployments_ls)
app.add_typer(deployments_app)


def main() -> None:
    app(prog_name="keel")
