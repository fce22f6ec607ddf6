"""One settings object, typed and range-checked, read from the environment once per process.

``Settings(...)`` is explicit: it holds the defaults and what it is given, never the environment.
:meth:`Settings.from_env` is the one place that reads ``HEIMDALL_*`` variables (through
pydantic-settings' ``EnvSettingsSource``) and checks every value, so a bad variable stops a worker at
start with one clear line (:class:`~heimdall_inference.errors.ConfigError`) instead of misbehaving
later; ``HEIMDALL_PREFETCH_MULTIPLIER=0``, for instance, would otherwise mean "unlimited" to Celery.

:func:`process_settings` is this process' copy: the worker's main process reads it when Celery loads
``celeryconfig`` and its forked children inherit that object; a CLI command reads it once. Production
defaults follow the compose service names (``rabbitmq``, ``redis``, ``db``, ``minio``, ``mlflow``);
credentials come from the environment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError
from .registry.routes import Routes, parse_routes
from .registry.uri import parse_model_uri

__all__ = ["Settings", "ENV_PREFIX", "process_settings", "set_process_settings", "redact_url", "parse_band_models"]

ENV_PREFIX = "HEIMDALL_"
_RABBITMQ_CONSUMER_TIMEOUT_S = 30 * 60  #: RabbitMQ's default consumer_timeout: a task must end well before it


class Settings(BaseSettings):
    """Service settings; ``Settings.from_env()`` reads ``HEIMDALL_<FIELD>`` for every field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True)

    broker_url: str = Field("amqp://guest:guest@rabbitmq:5672//", min_length=1)  #: RabbitMQ (publisher confirms on)
    result_backend: str = Field("redis://redis:6379/0", min_length=1)  #: where task results live (expiring)
    cache_url: str = "redis://redis:6379/1"  #: prediction cache; "" disables it
    database_url: str = Field("postgresql://heimdall:heimdall@db:5432/heimdall", min_length=1)  #: predictions table
    model_path: str = ""  #: ONNX file; "" = the model shipped in the package (HEIMDALL_MODEL_URI wins when set)
    #: what to serve: "" (model_path, else the shipped model), a file, models:/<name>@<alias> or models:/<name>/<version>
    #: (the MLflow registry at MLFLOW_TRACKING_URI)
    model_uri: str = Field("", max_length=1024)
    model_cache_dir: str = ""  #: verified registry downloads on this host ("" = <data_dir>/models or ~/.cache/heimdall/models)
    registry_timeout_s: float = Field(5.0, gt=0, le=300)  #: per registry request at start (then the cached version)
    #: how often a worker serving models:/name@alias asks the registry whether the alias moved (0 = only on
    #: `heimdall-inference model reload`)
    model_poll_s: float = Field(30.0, ge=0, le=86_400)
    #: A/B split between refs (aliases or versions) of HEIMDALL_MODEL_URI's model, sticky by session_id:
    #: "production=90,challenger=10" ("" = the served model answers everything)
    model_split: str = Field("", max_length=512)
    #: a ref run in shadow on every fix another model served (stored beside it, never returned); "" = off
    model_shadow: str = Field("", max_length=64)
    #: refs a payload's options.model may ask for besides the served model and the split's arms: "challenger,7"
    model_allow: str = Field("", max_length=512)
    #: the models of the network's other bands, beside HEIMDALL_MODEL_URI's: comma-separated model URIs (a file,
    #: models:/<name>@<alias>, shipped:<band>), each serving the centre frequencies its metadata declares; "shipped"
    #: (the default) stands for every model shipped in the package (2 m and 70 cm; the served model's own band is
    #: left to it); "none" for none (a payload of another band is then unsupported_frequency)
    band_models: str = Field("shipped", max_length=2048)
    onnx_threads: int = Field(1, ge=1, le=64)  #: intra-op threads per worker child (children x threads <= cores)
    onnx_providers: str = Field("CPUExecutionProvider", min_length=1)  #: comma-separated execution providers, in order
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)  #: cap on one serialized payload
    result_expires_s: int = Field(3600, ge=1)  #: task results expire from the backend after this long
    cache_ttl_s: int = Field(86_400, ge=1)  #: a cached fix lives this long
    task_soft_time_limit_s: float = Field(20.0, gt=0)  #: SoftTimeLimitExceeded after this long
    task_time_limit_s: float = Field(30.0, gt=0, lt=_RABBITMQ_CONSUMER_TIMEOUT_S)  #: the child is killed after this long
    #: a cold shutdown (SIGQUIT; SIGTERM in the image) gives running tasks this long before ending them; Celery sleeps
    #: in its signal handler meanwhile (no heartbeats), so keep it well below the broker's heartbeat timeout
    shutdown_timeout_s: float = Field(20.0, ge=0, le=45)
    #: a child is replaced after a task leaves its resident memory above this (MiB); children measure ~400 MiB, and
    #: 2 x 700 MiB + the main process' ~200 MiB stays inside the image's 2 GiB limit, so the recycle comes first
    max_memory_per_child_mb: int = Field(700, ge=200, le=65_536)
    delivery_limit: int = Field(5, ge=1, le=1000)  #: quorum queue redeliveries before a message is dead-lettered
    prefetch_multiplier: int = Field(32, ge=1, le=4096)  #: live messages reserved per child (0 would mean unlimited)
    #: batch messages (chord chunks, ~4 MB each) reserved per child: a few keep the children busy; more would only
    #: hold megabytes in the worker's main process (and take its time reading them while live fixes wait)
    batch_prefetch_multiplier: int = Field(2, ge=1, le=1024)
    db_pool_max: int = Field(4, ge=1, le=100)  #: PostgreSQL connections per worker child
    db_schema: str = Field("public", pattern=r"^[a-z_][a-z0-9_]{0,62}$")  #: schema of predictions and rejections
    db_retry_max: int = Field(40, ge=0, le=1000)  #: task retries (backoff 1 s doubling, capped at 60 s) while the database is unreachable
    #: a statement (e.g. an insert waiting on a locked table) is cancelled after this long and the write retried;
    #: 0 = no limit. Keep it below the soft time limit, so that a slow database is a retry, not a time limit
    db_statement_timeout_ms: int = Field(10_000, ge=0, le=3_600_000)
    #: db init: use TimescaleDB where it works ("auto"), require it ("on"), or a plain table ("off")
    timescaledb: Literal["auto", "on", "off"] = "auto"
    #: prefix of every Redis key (cache and task results); "" or ending in ":", "_", "-" or "." (Celery would
    #: otherwise add "_" to the results' keys and they would not be where the documentation says)
    redis_key_prefix: str = Field("heimdall:", max_length=128, pattern=r"^(|.*[:_.-])$")
    batch_max: int = Field(32, ge=1, le=1024)  #: prefork: up to this many waiting heimdall.predict tasks per child pass (1 = off)
    queue: str = Field("heimdall.predict", pattern=r"^[A-Za-z0-9_.:-]{1,200}$")  #: the work queue (live fixes)
    #: the queue of batch work (chord chunks, their callback, predict_batch): live fixes never wait behind it
    batch_queue: str = Field("heimdall.batch", pattern=r"^[A-Za-z0-9_.:-]{1,200}$")
    #: prefork: children kept free of batch chunks while live heimdall.predict tasks arrive (batch work keeps one)
    live_reserved_children: int = Field(1, ge=0, le=1024)
    #: how long after the last live request that reservation holds (then batch work may take every child)
    live_window_s: float = Field(2.0, ge=0.0, le=3600.0)
    s3_endpoint_url: str = ""  #: MinIO/S3 endpoint for iq_ref claim checks ("" = iq_ref not served)
    #: worker log lines: "text" (Celery's format) or "json" (one object per line: task id, request id, model version)
    log_format: Literal["text", "json"] = "text"
    metrics_port: int = Field(0, ge=0, le=65535)  #: Prometheus /metrics and /healthz port per worker (0 = off)
    data_dir: str = ""  #: embedded mode: where the filesystem broker, results and SQLite live

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Constructing Settings never reads the environment: only :meth:`from_env` does."""
        return (init_settings,)

    @model_validator(mode="after")
    def _limits_in_order(self) -> "Settings":
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ValueError(f"task_soft_time_limit_s ({self.task_soft_time_limit_s}) must be below "
                             f"task_time_limit_s ({self.task_time_limit_s})")
        a, b = sorted((self.queue, self.batch_queue), key=len)
        if a == b or b.startswith(a + "."):  # each is bound as "<name>.#": one would receive the other's messages
            raise ValueError(f"queue ({self.queue!r}) and batch_queue ({self.batch_queue!r}) must differ, and neither "
                             "may start with the other's name and a dot (live fixes would wait behind batch work)")
        self.band_model_uris()
        if self.routes().active and parse_model_uri(self.model_uri or self.model_path).kind != "registry":
            raise ValueError("HEIMDALL_MODEL_SPLIT, HEIMDALL_MODEL_SHADOW and HEIMDALL_MODEL_ALLOW name versions of a "
                             "registered model: set HEIMDALL_MODEL_URI=models:/<name>@<alias>")
        return self

    def routes(self) -> Routes:
        """The A/B split, shadow and allow-list (:mod:`~heimdall_inference.registry.routes`); ConfigError if invalid."""
        return parse_routes(self.model_split, self.model_shadow, self.model_allow)

    def band_model_uris(self) -> tuple[str, ...]:
        """HEIMDALL_BAND_MODELS as model URIs, in the order given ("shipped" expanded); ConfigError if one is invalid."""
        return parse_band_models(self.band_models)

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Read ``HEIMDALL_*`` from the environment, apply ``overrides``, check every value.

        Raises :class:`ConfigError` naming each offending variable.
        """
        values = EnvSettingsSource(cls)()
        try:
            return cls(**{**values, **overrides})
        except ValidationError as exc:
            raise ConfigError(_describe(exc, from_env=set(values) - set(overrides))) from None

    @classmethod
    def embedded(cls, data_dir: str | Path, **overrides: Any) -> "Settings":
        """No servers: a filesystem broker (kombu's, with atomic publishes), file results, SQLite predictions."""
        d = Path(data_dir).resolve()
        return cls(**{"broker_url": "heimdallfs://", "result_backend": f"file://{d / 'results'}", "cache_url": "",
                      "database_url": f"sqlite:///{d / 'heimdall.sqlite3'}", "data_dir": str(d), **overrides})

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied and checked (``model_copy`` would not check them)."""
        try:
            return type(self)(**{**self.model_dump(), **changes})
        except ValidationError as exc:
            raise ConfigError(_describe(exc, from_env=set())) from None

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.onnx_providers.split(",") if p.strip())

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in another process."""
        return {ENV_PREFIX + name.upper(): str(value) for name, value in self.model_dump().items()}

    def redacted(self) -> dict[str, Any]:
        """The settings with the passwords in URLs replaced by ``***`` (for logs and reports)."""
        return {k: _redact(v) if isinstance(v, str) else v for k, v in self.model_dump().items()}


def parse_band_models(text: str) -> tuple[str, ...]:
    """``HEIMDALL_BAND_MODELS`` -> model URIs: "shipped" becomes ``shipped:<band>`` for every shipped model, "none" (or
    nothing) none; each other entry must be a model URI (:func:`~heimdall_inference.registry.uri.parse_model_uri`)."""
    from .registry.uri import SHIPPED_BANDS

    out: list[str] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry or entry == "none":
            continue
        expanded = [f"shipped:{b}" for b in SHIPPED_BANDS] if entry == "shipped" else [entry]
        for uri in expanded:
            try:
                parsed = parse_model_uri(uri)
            except ConfigError as exc:
                raise ValueError(f"HEIMDALL_BAND_MODELS: {exc}") from None
            if parsed.kind == "shipped" and parsed.path is None:
                raise ValueError(f"HEIMDALL_BAND_MODELS: {entry!r} is not a model URI")
            if uri not in out:
                out.append(uri)
    if len(out) > 8:
        raise ValueError(f"HEIMDALL_BAND_MODELS names {len(out)} models; at most 8")
    return tuple(out)


def redact_url(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://user:***@host`` (also ``scheme://:password@host``)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


_redact = redact_url


def _describe(exc: ValidationError, *, from_env: set[str]) -> str:
    lines = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ")
        if not name:  # a rule across settings
            lines.append(msg)
            continue
        where = f"{ENV_PREFIX}{name.upper()}" if name in from_env else name
        value = err.get("input")
        got = f"={_redact(str(value))!r}" if not isinstance(value, dict) else ""
        lines.append(f"{where}{got}: {msg}")
    return "invalid settings: " + "; ".join(lines)


_process: Settings | None = None


def process_settings() -> Settings:
    """This process' settings: read from the environment on first use, then the same object.

    The worker's main process reads them when Celery loads ``celeryconfig``; forked pool children
    inherit that object, so a worker reads its environment once.
    """
    global _process
    if _process is None:
        _process = Settings.from_env()
    return _process


def set_process_settings(settings: Settings | None) -> None:
    """Replace this process' settings (a producer re-pointed by ``configure_app``; None: read again)."""
    global _process
    _process = settings
