"""One settings object, read from the environment once at start-up (worker, CLI) and passed down.

Every field has a named default and its unit in its name. Production defaults follow the compose
service names (``rabbitmq``, ``redis``, ``db``, ``minio``, ``mlflow``); credentials come from the
environment, never the code (the defaults carry the images' stock development credentials only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Settings", "ENV_PREFIX"]

ENV_PREFIX = "HEIMDALL_"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Service settings; ``Settings.from_env()`` reads ``HEIMDALL_<FIELD>`` for every field."""

    broker_url: str = "amqp://guest:guest@rabbitmq:5672//"  #: RabbitMQ (publisher confirms on)
    result_backend: str = "redis://redis:6379/0"  #: where task results live (expiring)
    cache_url: str = "redis://redis:6379/1"  #: prediction cache; "" disables it
    database_url: str = "postgresql://heimdall:heimdall@db:5432/heimdall"  #: predictions table
    model_path: str = ""  #: ONNX file; "" = the model shipped in the package
    onnx_threads: int = 1  #: intra-op threads per worker child (children x threads <= cores)
    onnx_providers: str = "CPUExecutionProvider"  #: comma-separated execution providers, in order
    max_payload_bytes: int = 8 * 1024 * 1024  #: cap on one serialized payload
    result_expires_s: int = 3600  #: task results expire from the backend after this long
    cache_ttl_s: int = 86_400  #: a cached fix lives this long
    task_soft_time_limit_s: float = 20.0  #: SoftTimeLimitExceeded after this long
    task_time_limit_s: float = 30.0  #: the child is killed after this long (well below consumer_timeout)
    delivery_limit: int = 5  #: quorum queue redeliveries before a message is dead-lettered
    prefetch_multiplier: int = 32  #: messages reserved per child: micro-batches are drawn from them
    db_pool_max: int = 4  #: PostgreSQL connections per worker child
    db_schema: str = "public"  #: PostgreSQL schema of the predictions and rejections tables
    db_retry_max: int = 40  #: task retries (backoff 1 s doubling, capped at 60 s) while the database is unreachable
    redis_key_prefix: str = "heimdall:"  #: prefix of every Redis key (prediction cache and task results)
    batch_max: int = 32  #: prefork: up to this many waiting heimdall.predict tasks per child pass (1 = off)
    queue: str = "heimdall.predict"  #: the work queue
    s3_endpoint_url: str = ""  #: MinIO/S3 endpoint for iq_ref claim checks ("" = iq_ref not served)
    metrics_port: int = 0  #: Prometheus /metrics and /healthz port per worker (0 = off)
    data_dir: str = ""  #: embedded mode: where the filesystem broker, results and SQLite live

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read ``HEIMDALL_*`` variables (typed by the field's default), then apply ``overrides``."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = ENV_PREFIX + f.name.upper()
            if key in env:
                values[f.name] = type(f.default)(env[key])
        return replace(cls(**values), **overrides)

    @classmethod
    def embedded(cls, data_dir: str | Path, **overrides: Any) -> "Settings":
        """No servers: a filesystem broker (kombu's, with atomic publishes), file results, SQLite predictions."""
        d = Path(data_dir).resolve()
        return cls(broker_url="heimdallfs://", result_backend=f"file://{d / 'results'}", cache_url="",
                   database_url=f"sqlite:///{d / 'heimdall.sqlite3'}", data_dir=str(d), **overrides)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.onnx_providers.split(",") if p.strip())

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}
