"""The metadata tables. Migrations in `store/migrations` create and evolve them;
this module is what the code queries through.

Times are epoch seconds (float) so that SQLite and PostgreSQL behave alike.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from keel.store.limits import clean_text

# Bump together with a new file in store/migrations/versions.
SCHEMA_REVISION = "0011"

metadata = MetaData()


class RequestText(TypeDecorator[str]):
    """Text as a request gave it (a URL path): a NUL character or a lone surrogate is
    escaped when written, so recording a bad request never fails (on PostgreSQL)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return clean_text(value) if value is not None else None


# A metric's step: 64-bit everywhere (SQLite's INTEGER already is; migration 0009).
STEP = BigInteger().with_variant(Integer, "sqlite")

runs = Table(
    "keel_runs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("workflow", String(200), nullable=False),
    Column("entrypoint", Text),
    Column("status", String(16), nullable=False),
    Column("params", Text),
    Column("tags", Text),
    Column("tasks", Text),  # JSON: each task's options as used by the run (resources, retries...)
    Column("parent_id", String(64)),
    Column("parent_seq", Integer),
    Column("retry_of", String(64)),
    Column("executor", String(40)),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("result_serializer", String(40)),
    Column("result_inline", LargeBinary),
    Column("result_ref", String(64)),
    Column("result_type", String(200)),
    Column("error_type", String(200)),
    Column("error_message", Text),
    Column("traceback", Text),
    Column("host", String(200)),
    Column("pid", Integer),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    # Tracking: the experiment the run belongs to, its display name, and whether it
    # is a workflow run or a run opened with keel.start_run.
    Column("experiment_id", Integer),
    Column("run_name", String(250)),
    Column("kind", String(16), nullable=False, default="workflow"),
    Column("user", String(100)),
    Column("lifecycle_stage", String(16), nullable=False, default="active"),
    # Scheduling: where a queued run waits, when a suspended run wakes, what started it.
    Column("queue", String(100)),
    Column("priority", Integer),
    Column("wake_at", Float),
    Column("schedule", String(200)),
    Column("logical_date", Float),
    Column("trigger_name", String(200)),
    Index("ix_keel_runs_workflow_created", "workflow", "created_at"),
    Index("ix_keel_runs_experiment", "experiment_id", "created_at"),
    Index("ix_keel_runs_created", "created_at"),
    Index("ix_keel_runs_status", "status"),
    # Serves both "children of a run" and the newest top-level runs (parent_id IS NULL
    # ORDER BY created_at DESC) without sorting the table.
    Index("ix_keel_runs_parent_created", "parent_id", "created_at", "id"),
)

steps = Table(
    "keel_steps",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("key", String(250), nullable=False),
    Column("task", String(200), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("deps", Text),
    Column("output_serializer", String(40)),
    Column("output_inline", LargeBinary),
    Column("output_ref", String(64)),
    Column("output_hash", String(64)),
    Column("output_type", String(200)),
    Column("output_size", Integer),
    Column("cache_key", String(64)),
    Column("cache_info", Text),
    Column("cached_from", String(100)),
    Column("child_run_id", String(64)),
    Column("error_type", String(200)),
    Column("error_message", Text),
    # Partial: most outputs are inline, and every step row would otherwise pay for it.
    Index(
        "ix_keel_steps_output_ref",
        "output_ref",
        sqlite_where=text("output_ref IS NOT NULL"),
        postgresql_where=text("output_ref IS NOT NULL"),
    ),
)

attempts = Table(
    "keel_attempts",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("status", String(16), nullable=False),
    Column("started_at", Float),
    Column("ended_at", Float),
    Column("error_type", String(200)),
    Column("error_message", Text),
    Column("traceback", Text),
)

logs = Table(
    "keel_logs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("stream", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_keel_logs_run_seq", "run_id", "seq", "attempt"),
)

artifacts = Table(
    "keel_artifacts",
    metadata,
    Column("hash", String(64), primary_key=True),
    Column("size", Integer, nullable=False),
    Column("serializer", String(40), nullable=False),
    Column("type_name", String(200)),
    Column("uri", Text, nullable=False),
    Column("run_id", String(64)),
    Column("seq", Integer),
    Column("created_at", Float, nullable=False),
)

cache_entries = Table(
    "keel_cache",
    metadata,
    Column("cache_key", String(64), primary_key=True),
    Column("task", String(200), nullable=False),
    Column("run_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_keel_cache_task", "task", "created_at"),
)


# -- tracking ------------------------------------------------------------------
# Params, metrics, tags and logged artifacts belong to a tracked run: a run
# (seq = -1) or one of its steps (seq = the step's position), so every step is
# a nested run of its workflow run.

experiments = Table(
    "keel_experiments",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(250), nullable=False, unique=True),
    Column("lifecycle_stage", String(16), nullable=False, default="active"),
    Column("artifact_location", Text),
    Column("tags", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

params = Table(
    "keel_params",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("key", String(250), primary_key=True),
    Column("value", Text, nullable=False),
)

metrics = Table(
    "keel_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("key", String(250), nullable=False),
    Column("value", Float),  # NULL when is_nan: SQLite has no NaN
    Column("is_nan", Boolean, nullable=False, default=False),
    Column("step", STEP, nullable=False, default=0),
    Column("timestamp", Float, nullable=False),
    Index("ix_keel_metrics_run_key", "run_id", "seq", "key", "step"),
)

latest_metrics = Table(
    "keel_latest_metrics",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("key", String(250), primary_key=True),
    Column("value", Float),
    Column("is_nan", Boolean, nullable=False, default=False),
    Column("step", STEP, nullable=False, default=0),
    Column("timestamp", Float, nullable=False),
    Index("ix_keel_latest_metrics_key_value", "key", "value"),
)

tags = Table(
    "keel_tags",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("key", String(250), primary_key=True),
    Column("value", Text, nullable=False),
)

logged_artifacts = Table(
    "keel_logged_artifacts",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("path", String(1000), primary_key=True),
    Column("hash", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
)

# -- model registry ----------------------------------------------------------------

models = Table(
    "keel_models",
    metadata,
    Column("name", String(250), primary_key=True),
    Column("description", Text),
    Column("tags", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

model_versions = Table(
    "keel_model_versions",
    metadata,
    Column("name", String(250), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("flavor", String(40), nullable=False),
    Column("source_hash", String(64)),  # the model's bytes in the artifact store
    Column("source_uri", Text),
    Column("signature", Text),
    Column("meta", Text),  # flavor details, e.g. the scikit-learn version it was saved with
    Column("run_id", String(64)),
    Column("seq", Integer),
    Column("description", Text),
    Column("tags", Text),
    Column("status", String(16), nullable=False, default="READY"),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(100)),
)

model_aliases = Table(
    "keel_model_aliases",
    metadata,
    Column("name", String(250), primary_key=True),
    Column("alias", String(250), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", String(100)),
)

registry_events = Table(
    "keel_registry_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(250), nullable=False),
    Column("action", String(32), nullable=False),
    Column("version", Integer),
    Column("alias", String(250)),
    Column("previous_version", Integer),
    Column("detail", Text),
    Column("actor", String(100)),
    Column("at", Float, nullable=False),
    Index("ix_keel_registry_events_name", "name", "at"),
)


# -- scheduling and workers ----------------------------------------------------------
# One table of claimable work for every worker: runs (their workflow body) and
# steps sent to a named queue. A claim holds a lease that its worker renews; an
# expired lease makes the item claimable again.

queue_items = Table(
    "keel_queue",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("dedupe", String(250), nullable=False, unique=True),
    Column("kind", String(8), nullable=False),  # run | step
    Column("run_id", String(64), nullable=False),
    Column("seq", Integer),
    Column("attempt", Integer),
    Column("queue", String(100), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("pool", String(100)),
    Column("not_before", Float, nullable=False),
    Column("status", String(16), nullable=False),  # queued | claimed | done
    Column("claimed_by", String(100)),
    Column("lease_until", Float),
    Column("claims", Integer, nullable=False, default=0),
    Column("payload", LargeBinary),
    Column("outcome", LargeBinary),
    Column("created_at", Float, nullable=False),
    Column("done_at", Float),
    Index("ix_keel_queue_run", "run_id"),
    Index("ix_keel_queue_lease", "status", "lease_until"),
    # Ids name claims; SQLite would otherwise reuse the id of a collected newest row.
    sqlite_autoincrement=True,
)
# A claim reads a queue's queued items in the order it takes them (most urgent first,
# then oldest), so it stops after a few rows instead of sorting the whole backlog.
Index(
    "ix_keel_queue_pick",
    queue_items.c.status,
    queue_items.c.queue,
    queue_items.c.priority.desc(),
    queue_items.c.id,
)

workers = Table(
    "keel_workers",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)

pools = Table(
    "keel_pools",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("slots", Integer, nullable=False),
)

signals = Table(
    "keel_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("payload", Text),
    Column("sent_at", Float, nullable=False),
    Column("consumed_seq", Integer),
    Index("ix_keel_signals_run_name", "run_id", "name", "id"),
)

schedules = Table(
    "keel_schedules",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("workflow", String(200), nullable=False),
    Column("entrypoint", Text),
    Column("cron", String(100)),
    Column("interval_seconds", Float),
    Column("timezone", String(64), nullable=False, default="UTC"),
    Column("params", Text),
    Column("catchup", String(8), nullable=False, default="latest"),
    Column("overlap", String(16), nullable=False, default="queue"),
    Column("max_active_runs", Integer),
    Column("queue", String(100), nullable=False, default="default"),
    Column("priority", Integer, nullable=False, default=0),
    Column("paused", Boolean, nullable=False, default=False),
    Column("start_at", Float, nullable=False),
    Column("end_at", Float),
    Column("next_tick", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

ticks = Table(
    "keel_ticks",
    metadata,
    Column("schedule", String(200), primary_key=True),
    Column("logical_date", Float, primary_key=True),
    Column("run_id", String(64)),
    Column("created_at", Float, nullable=False),
)

triggers = Table(
    "keel_triggers",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("config", Text),
    Column("workflow", String(200), nullable=False),
    Column("entrypoint", Text),
    Column("params", Text),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("state", Text),
    Column("created_at", Float, nullable=False),
)

trigger_events = Table(
    "keel_trigger_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("trigger", String(200), nullable=False),
    Column("fired_at", Float, nullable=False),
    Column("cause", Text),
    Column("run_id", String(64)),
    Index("ix_keel_trigger_events_trigger", "trigger", "fired_at"),
)


# -- server: API tokens and the audit log of mutating calls ---------------------------

tokens = Table(
    "keel_tokens",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # viewer | operator | admin
    Column("token_hash", String(64), nullable=False, unique=True),  # sha256 of the token
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Column("revoked", Boolean, nullable=False, default=False),
)

audit_log = Table(
    "keel_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(200)),
    Column("role", String(16)),
    Column("method", String(8), nullable=False),
    Column("path", RequestText, nullable=False),
    Column("status", Integer, nullable=False),
    Column("detail", Text),
    Index("ix_keel_audit_at", "at"),
)


# -- MLflow compatibility: logged models (MLflow 3) ------------------------------------
# A logged model is a folder of files (MLmodel, the model's own files) that an MLflow
# client logs beside a run; `m-<32 hex>` ids, files by content hash in the artifact store.

logged_models = Table(
    "keel_logged_models",
    metadata,
    Column("model_id", String(64), primary_key=True),
    Column("experiment_id", Integer, nullable=False),
    Column("name", String(250), nullable=False),
    Column("source_run_id", String(64)),  # an MLflow run id: a run, or `<run_id>-<seq>` for a step
    Column("model_type", String(100)),
    Column("status", String(32), nullable=False),
    Column("status_message", Text),
    Column("tags", Text),  # JSON object
    Column("params", Text),  # JSON object
    Column("lifecycle_stage", String(16), nullable=False, default="active"),
    Column("created_by", String(200)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_keel_logged_models_experiment", "experiment_id", "name"),
    Index("ix_keel_logged_models_run", "source_run_id"),
)

# What MLflow's runs/log-inputs records: the datasets a run (or step) read and the
# logged models it used; `detail` is the JSON the client sent.
run_inputs = Table(
    "keel_run_inputs",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), primary_key=True),  # dataset | model
    Column("key", String(600), primary_key=True),  # name:digest of a dataset, a model's id
    Column("detail", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

logged_model_files = Table(
    "keel_logged_model_files",
    metadata,
    Column("model_id", String(64), primary_key=True),
    Column("path", String(1000), primary_key=True),
    Column("hash", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

# A running model or workflow server (`keel serve`): what it serves and where. The
# server writes the row when it starts, bumps `heartbeat_at` every few seconds and
# marks it stopped on exit; a row whose heartbeats stopped is shown as stale.
deployments = Table(
    "keel_deployments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("target", Text, nullable=False),  # models:/NAME@ALIAS, file.py:workflow, ...
    Column("kind", String(16), nullable=False),  # model | workflow
    Column("model", String(250)),  # the registered model's name, for a models:/ target
    Column("version", Integer),  # the version being served now
    Column("host", String(200), nullable=False),
    Column("port", Integer, nullable=False),
    Column("workers", Integer, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("machine", String(200), nullable=False),  # the hostname of the machine
    Column("state", String(16), nullable=False),  # starting | serving | stopped
    Column("last_error", Text),  # the last failed reload, until one succeeds
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
    # The server's traffic, written with each heartbeat: totals since it started, and
    # the request rate and latency percentiles over the last minute.
    Column("requests", BigInteger),
    Column("errors", BigInteger),
    Column("rate", Float),  # requests per second
    Column("p50_ms", Float),
    Column("p95_ms", Float),
    Index("ix_keel_deployments_model", "model", "version"),
)

# The inference log (`keel serve --log-requests`): one row per sampled request, written
# in batches by the server's background thread. Inputs and predictions are JSON, each
# left out (NULL, `truncated` set) when larger than the cap in store/inference_log.py.
inference_log = Table(
    "keel_inference_log",
    metadata,
    Column("id", STEP, primary_key=True, autoincrement=True),  # 64-bit ids (SQLite: rowid)
    Column("model", String(250), nullable=False),
    Column("version", Integer),  # None for a runs:/ URI
    Column("deployment_id", String(64)),
    Column("time", Float, nullable=False),  # when the request arrived
    Column("latency_ms", Float, nullable=False),
    Column("status", Integer, nullable=False),  # the HTTP status of the reply
    Column("inputs", Text),  # JSON: {"columns": [...], "data": [[...]]} or a list
    Column("predictions", Text),  # JSON list, one per input row
    Column("truncated", Boolean, nullable=False),
    Index("ix_keel_inference_log_version", "model", "version", "time"),
)
