"""The options of `keel serve` / `keel.serve`, checked once, shared by every module."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from keel.errors import ServingError

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 10 * 1024 * 1024


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    workers: int = 1
    max_batch_size: int = 32  # rows per predict call
    batch_wait_ms: float = 0.0  # how long a batch waits for more rows (0: only what queued)
    max_body_bytes: int = DEFAULT_MAX_BODY
    request_timeout: float = 30.0  # seconds from arrival to reply, else 504
    poll_seconds: float = 1.0  # how often an alias is looked up
    graceful_timeout: float = 10.0  # how long in-flight requests get at shutdown
    deployment_id: str | None = None  # the store row this server reports to
    allowed_hosts: tuple[str, ...] = ()  # more Host names callers may use (serving/gate.py)
    insecure_no_auth: bool = False  # beyond loopback, anonymous callers while no token exists
    log_requests: bool = False  # the inference log (serving/request_log.py)
    log_sample_rate: float = 1.0  # the share of requests logged, 0 to 1
    log_queue_size: int = 10_000  # requests waiting for the log's writer; more are dropped

    def __post_init__(self) -> None:
        # Through KEEL_SERVE_SPEC (JSON) to worker processes the tuple comes back a list.
        hosts = self.allowed_hosts
        if isinstance(hosts, str) or not all(isinstance(h, str) for h in hosts):
            raise ServingError(f"allowed_hosts must be host names, got {hosts!r}")
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        positive = {
            "workers": self.workers,
            "max_batch_size": self.max_batch_size,
            "max_body_bytes": self.max_body_bytes,
            "request_timeout": self.request_timeout,
            "log_queue_size": self.log_queue_size,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ServingError(
                    f"{name} must be a positive number, got {value!r}",
                    hint=f"e.g. --{name.replace('_', '-')} 1",
                )
        for name, value in {
            "batch_wait_ms": self.batch_wait_ms,
            "poll_seconds": self.poll_seconds,
            "graceful_timeout": self.graceful_timeout,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ServingError(f"{name} must be 0 or more, got {value!r}")
        rate = self.log_sample_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise ServingError(
                f"log_sample_rate must be between 0 and 1, got {rate!r}",
                hint="e.g. --log-sample-rate 0.1 logs one request in ten",
            )
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ServingError(f"port must be a number, got {self.port!r}")
        if not 0 <= self.port <= 65535:
            raise ServingError(f"port must be between 0 and 65535, got {self.port}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
