"""The metadata store: every run, step, attempt, log line and cache entry.

One class over SQLAlchemy Core; the same code serves SQLite (WAL) and PostgreSQL.
The engine writes through `write_batch` (one transaction per group of events),
everything else reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, Row

from keel.errors import ConfigError, RunNotFoundError, StoreUnavailableError
from keel.store import schema
from keel.store.config import StoreConfig
from keel.store.schema import attempts, cache_entries, logs, runs, steps


@dataclass(slots=True)
class Batch:
    """Rows the engine wants recorded together, in one transaction."""

    runs_new: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)
    run_updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Tracking rows, as tuples in the column order of TRACKING_COLUMNS.
    metrics: list[tuple[Any, ...]] = field(default_factory=list)
    latest_metrics: list[tuple[Any, ...]] = field(default_factory=list)
    params: list[tuple[Any, ...]] = field(default_factory=list)
    tags: list[tuple[Any, ...]] = field(default_factory=list)
    logged_artifacts: list[tuple[Any, ...]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.runs_new
            or self.steps
            or self.attempts
            or self.logs
            or self.artifacts
            or self.cache
            or self.run_updates
            or self.metrics
            or self.params
            or self.tags
            or self.logged_artifacts
        )


METRIC_COLUMNS = ("run_id", "seq", "key", "value", "is_nan", "step", "timestamp")
TRACKING_COLUMNS = {
    "keel_metrics": METRIC_COLUMNS,
    "keel_latest_metrics": METRIC_COLUMNS,
    "keel_params": ("run_id", "seq", "key", "value"),
    "keel_tags": ("run_id", "seq", "key", "value"),
    "keel_logged_artifacts": ("run_id", "seq", "path", "hash", "size", "kind", "created_at"),
}


def describe_url(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL lets readers (the CLI, the UI) work while a run writes; NORMAL sync is
    # safe against process crashes, which is what durability here is about.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@contextmanager
def _sqlite_migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock on a file beside a SQLite database, for the migration (SQLite
    has no advisory locks, and a migration rebuilds tables over several statements)."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: migrations are not serialized there
        yield
        return
    with open(f"{Path(database).expanduser()}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MetadataStore:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.url = config.db_url
        self.engine = self._create_engine(config.db_url)
        self.dialect = self.engine.dialect.name
        self._sql_cache: dict[tuple[str, tuple[str, ...]], str] = {}
        self._ensure_schema()

    # -- opening --------------------------------------------------------------
    def _create_engine(self, url: str) -> Engine:
        shown = describe_url(url)
        try:
            parsed = sa.engine.make_url(url)
        except sa.exc.ArgumentError:
            raise ConfigError(
                f"the database URL {url!r} is not a valid SQLAlchemy URL",
                hint="Use e.g. sqlite:///path/to/keel.db or "
                "postgresql+psycopg://user@host:5432/db in KEEL_DB_URL",
            ) from None
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_pre_ping=True, pool_size=8, max_overflow=16)
        try:
            engine = sa.create_engine(url, **kwargs)
        except (sa.exc.NoSuchModuleError, ImportError, sa.exc.ArgumentError) as exc:
            raise ConfigError(
                f"cannot use the database URL {shown}: {exc}",
                hint="Supported: sqlite:///... and postgresql+psycopg://... "
                "(install keel[postgres] for PostgreSQL)",
            ) from None
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _ensure_schema(self) -> None:
        try:
            current = self._schema_revision()
            if current == schema.SCHEMA_REVISION:
                return
            self._migrate()
        except sa.exc.DatabaseError as exc:
            raise StoreUnavailableError(
                f"cannot open the metadata store at {describe_url(self.url)}: "
                f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}",
                hint="Check that the database is running and KEEL_DB_URL is right; "
                "a SQLite file that is not a keel database must be moved away",
            ) from None

    def _schema_revision(self) -> str | None:
        from keel.store.migrations.env_names import VERSION_TABLE

        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(VERSION_TABLE):
                return None
            return conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()

    def _migrate(self) -> None:
        # Alembic is imported only here: a store at the current revision never pays for it.
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        # Processes opening a fresh or older database at once (a worker fleet starting
        # up): one migrates, the others wait, then find the schema current.
        with _sqlite_migration_lock(self.engine), self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(4207001)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        if self._schema_revision() != schema.SCHEMA_REVISION:
            raise StoreUnavailableError(
                f"the metadata store at {describe_url(self.url)} could not be migrated "
                f"to revision {schema.SCHEMA_REVISION}",
                hint="Is it a database of a newer keel? Upgrade keel or use another KEEL_DB_URL",
            )

    # -- writes ---------------------------------------------------------------
    def _upsert(self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert or replace rows, in one executemany on the driver.

        This is the engine's hot path (two rows per step), so it skips SQLAlchemy's
        per-row parameter processing: the statement is plain SQL that SQLite and
        PostgreSQL both accept, and the rows go to the driver as tuples.
        """
        if not rows:
            return
        cols = tuple(rows[0])
        sql = self._upsert_sql(table, cols)
        conn.exec_driver_sql(sql, [tuple(row.get(c) for c in cols) for row in rows])

    def _upsert_sql(self, table: sa.Table, cols: tuple[str, ...]) -> str:
        key = (table.name, cols)
        sql = self._sql_cache.get(key)
        if sql is None:
            keys = [c.name for c in table.primary_key.columns]
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in keys)
            sql = (
                f"INSERT INTO {table.name} ({', '.join(cols)}) "
                f"VALUES ({', '.join(mark for _ in cols)}) "
                f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
            )
            self._sql_cache[key] = sql
        return sql

    def _insert_ignore(
        self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]
    ) -> None:
        if not rows:
            return
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            conn.execute(pg_insert(table).on_conflict_do_nothing(), rows)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            conn.execute(sqlite_insert(table).on_conflict_do_nothing(), rows)

    def write_batch(self, batch: Batch) -> None:
        with self.engine.begin() as conn:
            self._insert_ignore(conn, runs, batch.runs_new)
            self._insert_ignore(conn, schema.artifacts, batch.artifacts)
            self._upsert(conn, steps, batch.steps)
            self._upsert(conn, attempts, batch.attempts)
            if batch.logs:
                conn.execute(logs.insert(), batch.logs)
            self._upsert(conn, cache_entries, batch.cache)
            self._write_tracking(conn, batch)
            for run_id, values in batch.run_updates.items():
                conn.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def _write_tracking(self, conn: sa.Connection, batch: Batch) -> None:
        if batch.metrics:
            if self.dialect == "postgresql":
                # COPY moves a training loop's metric points several times faster
                # than an INSERT per row; it runs inside this same transaction.
                cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                columns = ", ".join(METRIC_COLUMNS)
                with cursor.copy(f"COPY keel_metrics ({columns}) FROM STDIN") as copy:
                    for row in batch.metrics:
                        copy.write_row(row)
            else:
                conn.exec_driver_sql(
                    self._tracking_sql("keel_metrics", upsert=False), batch.metrics
                )
        if batch.latest_metrics:
            conn.exec_driver_sql(self._tracking_sql("keel_latest_metrics"), batch.latest_metrics)
        for table, rows in (
            ("keel_params", batch.params),
            ("keel_tags", batch.tags),
            ("keel_logged_artifacts", batch.logged_artifacts),
        ):
            if rows:
                conn.exec_driver_sql(self._tracking_sql(table), rows)

    def _tracking_sql(self, table: str, upsert: bool = True) -> str:
        key = (table, (str(upsert),))
        sql = self._sql_cache.get(key)
        if sql is None:
            cols = TRACKING_COLUMNS[table]
            mark = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
            sql = (
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(mark for _ in cols)})"
            )
            if upsert:
                keys = [c.name for c in schema.metadata.tables[table].primary_key.columns]
                updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in keys)
                sql += f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
                if table == "keel_latest_metrics":
                    # The latest value is the one with the highest step, then the newest.
                    sql += (
                        f" WHERE excluded.step > {table}.step OR (excluded.step = {table}.step"
                        f" AND excluded.timestamp >= {table}.timestamp)"
                    )
            self._sql_cache[key] = sql
        return sql

    def insert_run(self, row: dict[str, Any], entry: dict[str, Any] | None = None) -> int | None:
        """Insert a run, and with it (same transaction) its queue `entry` if given;
        the entry's id."""
        with self.engine.begin() as conn:
            conn.execute(runs.insert(), [row])
            if entry is None:
                return None
            return int(
                conn.execute(
                    schema.queue_items.insert().values(entry).returning(schema.queue_items.c.id)
                ).scalar_one()
            )

    def update_run(self, run_id: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def fail_step(self, run_id: str, seq: int, error_type: str, error_message: str) -> None:
        """Mark a recorded step FAILED after the fact (a row of it was refused)."""
        with self.engine.begin() as conn:
            conn.execute(
                steps.update()
                .where(steps.c.run_id == run_id, steps.c.seq == seq)
                .values(status="FAILED", error_type=error_type, error_message=error_message)
            )

    def request_cancel(self, run_id: str) -> None:
        self.update_run(run_id, cancel_requested=True)

    def cancel_requested(self, run_ids: Iterable[str]) -> set[str]:
        ids = list(run_ids)
        if not ids:
            return set()
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(runs.c.id).where(runs.c.id.in_(ids), runs.c.cancel_requested)
            )
            return {r[0] for r in rows}

    def clear_cache(self, task: str | None = None) -> int:
        with self.engine.begin() as conn:
            stmt = cache_entries.delete()
            if task is not None:
                stmt = stmt.where(cache_entries.c.task == task)
            return int(conn.execute(stmt).rowcount or 0)

    # -- reads ----------------------------------------------------------------
    def get_run(self, run_id: str) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(runs).where(runs.c.id == run_id)).first()

    def resolve_run_id(self, run_id: str) -> str:
        """Accept a full id or an unambiguous prefix of one, as git does."""
        text = run_id.strip()
        if not text:
            raise RunNotFoundError(
                "an empty run id was given", hint="Pass a run id from `keel runs ls`"
            )
        with self.engine.connect() as conn:
            if conn.execute(sa.select(runs.c.id).where(runs.c.id == text)).first():
                return text
            found = conn.execute(
                sa.select(runs.c.id).where(runs.c.id.startswith(text, autoescape=True)).limit(3)
            ).all()
        if len(found) == 1:
            return str(found[0][0])
        if not found:
            raise RunNotFoundError(
                f"no run with id {text!r} in the store at {describe_url(self.url)}",
                hint="List runs with `keel runs ls`; check KEEL_HOME / KEEL_DB_URL",
            )
        raise RunNotFoundError(
            f"run id prefix {text!r} is ambiguous ({', '.join(r[0] for r in found)}, ...)",
            hint="Give more characters of the id",
        )

    def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | Sequence[str] | None = None,
        parent_id: str | None = None,
        top_level: bool = False,
        limit: int | None = 50,
    ) -> list[Row[Any]]:
        stmt = sa.select(runs).order_by(runs.c.created_at.desc(), runs.c.id.desc())
        if workflow is not None:
            stmt = stmt.where(runs.c.workflow == workflow)
        if status is not None:
            wanted = [status] if isinstance(status, str) else list(status)
            stmt = stmt.where(runs.c.status.in_([s.upper() for s in wanted]))
        if parent_id is not None:
            stmt = stmt.where(runs.c.parent_id == parent_id)
        elif top_level:
            stmt = stmt.where(runs.c.parent_id.is_(None))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).all())

    def load_steps(self, run_id: str) -> list[Row[Any]]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(sa.select(steps).where(steps.c.run_id == run_id).order_by(steps.c.seq))
            )

    def get_step(self, run_id: str, seq: int) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(steps).where(steps.c.run_id == run_id, steps.c.seq == seq)
            ).first()

    def load_attempts(self, run_id: str, seq: int | None = None) -> list[Row[Any]]:
        stmt = sa.select(attempts).where(attempts.c.run_id == run_id)
        if seq is not None:
            stmt = stmt.where(attempts.c.seq == seq)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt.order_by(attempts.c.seq, attempts.c.attempt)))

    def load_logs(
        self,
        run_id: str,
        seq: int | None = None,
        attempt: int | None = None,
        *,
        after: int | None = None,
    ) -> list[Row[Any]]:
        """Log rows in recorded order; `after`: only those with a larger id."""
        stmt = sa.select(logs).where(logs.c.run_id == run_id)
        if seq is not None:
            stmt = stmt.where(logs.c.seq == seq)
        if attempt is not None:
            stmt = stmt.where(logs.c.attempt == attempt)
        if after is not None:
            stmt = stmt.where(logs.c.id > after)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt.order_by(logs.c.id)))

    def find_cached(self, cache_key: str) -> Row[Any] | None:
        """The step whose output a cache key points at, if it still exists and succeeded."""
        stmt = (
            sa.select(steps)
            .join(
                cache_entries,
                sa.and_(
                    steps.c.run_id == cache_entries.c.run_id, steps.c.seq == cache_entries.c.seq
                ),
            )
            .where(
                cache_entries.c.cache_key == cache_key, steps.c.status.in_(["SUCCEEDED", "CACHED"])
            )
        )
        with self.engine.connect() as conn:
            return conn.execute(stmt).first()

    def steps_consuming(self, run_id: str, seq: int) -> list[Row[Any]]:
        """Steps of the same run that took the output of step `seq` as an input."""
        # deps is a JSON list of seqs; the run is scanned once, which is fine for a lookup.
        import json

        return [row for row in self.load_steps(run_id) if row.deps and seq in json.loads(row.deps)]

    def steps_with_output(self, digest: str) -> list[Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(steps).where(steps.c.output_ref == digest)))

    def get_artifact(self, digest: str) -> Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(schema.artifacts).where(schema.artifacts.c.hash == digest)
            ).first()

    def dispose(self) -> None:
        self.engine.dispose()


_stores: dict[tuple[str, str], MetadataStore] = {}
_stores_lock = threading.Lock()


def open_store(config: StoreConfig | None = None) -> MetadataStore:
    """The process-wide store for a configuration (opened and migrated once)."""
    config = config or StoreConfig.from_env()
    key = (config.db_url, config.artifacts_url)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = MetadataStore(config)
        return store


def now() -> float:
    return time.time()
