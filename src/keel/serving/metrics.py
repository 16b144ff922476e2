"""`GET /metrics`: the endpoint's counters in Prometheus' text format.

Each server (each worker process, with `--workers`) keeps its own registry, labelled
by model and version, so a version's traffic is told apart across a reload.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LABELS = ("model", "version")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "keel_serve_requests",
            "Requests to /invocations, by the status of the reply",
            (*_LABELS, "status"),
            registry=self.registry,
        )
        self.errors = Counter(
            "keel_serve_errors",
            "Requests to /invocations answered with an error, by its code",
            (*_LABELS, "code"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "keel_serve_request_seconds",
            "Time from a request's arrival to its reply",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "keel_serve_in_flight",
            "Requests to /invocations received and not yet answered",
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "keel_serve_batch_rows",
            "Rows per predict call (micro-batches coalesce requests)",
            _LABELS,
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )

        self.log_written = Counter(
            "keel_serve_log_written",
            "Requests written to the inference log (--log-requests)",
            registry=self.registry,
        )
        self.log_dropped = Counter(
            "keel_serve_log_dropped",
            "Sampled requests the inference log dropped: its queue was full or the "
            "store refused the write",
            registry=self.registry,
        )

    def observe(
        self, model: str, version: str, status: int, seconds: float, code: str | None
    ) -> None:
        self.requests.labels(model, version, str(status)).inc()
        self.latency.labels(model, version).observe(seconds)
        if code is not None:
            self.errors.labels(model, version, code).inc()

    def batch(self, model: str, version: str, rows: int) -> None:
        self.batch_rows.labels(model, version).observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
