"""Per-process set-up of the worker: the warm model, the store and the cache live in each child.

The ONNX session is created after fork (``worker_process_init``), never in the parent: sessions
inherited across fork can crash. The handler must finish within seconds (Celery kills slow
children), so it only loads the model (~0.1 s), opens the pool without waiting, and connects the
cache lazily. Pools that do not fork (solo, threads) get the same state lazily on first use.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from .cache import FixCache
from .metrics import MetricsExporter, ServiceMetrics, prepare_multiprocess_dir
from .pipeline import Localizer
from .service import Service
from .session import SessionOptions
from .settings import Settings
from .store import open_store
from .topology import dead_queue, is_amqp

__all__ = ["get_service", "build_service", "reset_service"]

log = logging.getLogger(__name__)
_lock = threading.Lock()
_service: Service | None = None
_metrics: ServiceMetrics | None = None
_exporter: MetricsExporter | None = None


def build_service(settings: Settings) -> Service:
    """The Service for one process, from settings."""
    from .payload import Limits

    loc = Localizer(settings.model_path or None,
                    session_options=SessionOptions(intra_op_threads=settings.onnx_threads,
                                                   providers=settings.providers),
                    limits=Limits(max_payload_bytes=settings.max_payload_bytes),
                    fetch_iq_ref=_iq_ref_fetcher(settings))
    store = open_store(settings.database_url, schema=settings.db_schema, pool_max=settings.db_pool_max)
    cache = FixCache(settings.cache_url, ttl_s=settings.cache_ttl_s, prefix=settings.redis_key_prefix) \
        if settings.cache_url else None
    return Service(loc, store, cache, metrics=_child_metrics(settings))


def _child_metrics(settings: Settings) -> ServiceMetrics | None:
    """This process' metrics when the worker exports them (multiprocess folder set up by the parent)."""
    global _metrics
    if settings.metrics_port <= 0 or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    if _metrics is None:  # one set per process: prometheus-client refuses duplicate names
        _metrics = ServiceMetrics()
    return _metrics


def _iq_ref_fetcher(settings: Settings):
    if not settings.s3_endpoint_url:
        return None
    from .objectstore import S3Fetcher

    return S3Fetcher(settings.s3_endpoint_url)


def get_service() -> Service:
    """This process' Service, built on first use when no fork signal built it."""
    global _service
    if _service is None:
        with _lock:
            if _service is None:
                _service = build_service(Settings.from_env())
    return _service


def reset_service(service: Service | None = None) -> None:
    """Replace (or drop) this process' Service (tests, hot swap)."""
    global _service
    with _lock:
        old, _service = _service, service
    if old is not None and old is not service:
        old.close()


@worker_init.connect
def _declare_dead_letter_queue(sender: Any = None, **_: Any) -> None:
    """Declare heimdall.dead once per worker so that dead letters have somewhere to go."""
    if sender is None or not is_amqp(str(sender.app.conf.broker_url)):
        return
    try:
        with sender.app.connection_for_write() as conn:
            dead_queue()(conn.default_channel).declare()
    except Exception:
        log.exception("could not declare heimdall.dead; dead letters would be dropped")


@worker_init.connect
def _start_metrics(sender: Any = None, **_: Any) -> None:
    """With HEIMDALL_METRICS_PORT: the multiprocess folder (before the pool forks) and the exporter."""
    global _exporter
    settings = Settings.from_env()
    if settings.metrics_port <= 0 or sender is None:
        return
    try:
        own_folder = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        folder = prepare_multiprocess_dir()
        _exporter = MetricsExporter(settings.metrics_port, health=lambda: worker_health(sender),
                                    multiprocess_dir=folder).start()
        _exporter.remove_on_stop = own_folder
    except Exception:  # no metrics is bad; no worker would be worse
        log.exception("could not start the metrics exporter on port %d", settings.metrics_port)


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    global _exporter
    if _exporter is not None:
        _exporter.stop()
        _exporter = None


def worker_health(worker: Any) -> dict[str, Any]:
    """``/healthz``: ok while the pool has live children and the consumer is connected to the broker."""
    pool = getattr(worker, "pool", None)
    info = pool.info if pool is not None else {}
    children = len(info.get("processes", [])) if isinstance(info, dict) else 0
    consumer = getattr(worker, "consumer", None)
    conn = getattr(consumer, "connection", None)
    connected = bool(conn is not None and conn.connected)
    return {"status": "ok" if children and connected else "unhealthy", "children": children,
            "broker_connected": connected, "pid": os.getpid()}


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    global _service
    try:
        _service = build_service(Settings.from_env())
    except Exception:  # leave it lazy: the first task reports the real error
        log.exception("could not build the service in this child")


@worker_process_shutdown.connect
def _close_child(**_: Any) -> None:
    reset_service(None)
