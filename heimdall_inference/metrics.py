"""Prometheus metrics per worker: counters and histograms in every child, one exporter per worker.

With ``HEIMDALL_METRICS_PORT`` set, the worker's main process (``worker_init``) points
prometheus-client's multiprocess mode at a fresh folder (``PROMETHEUS_MULTIPROC_DIR``, unless the
deployment set one), then serves on that port:

* ``GET /metrics`` — every child's counters and histograms, summed (``MultiProcessCollector``);
* ``GET /healthz`` — 200 ``{"status": "ok", ...}`` while the worker's pool has live children, else 503.

Children record through :class:`ServiceMetrics` (built after fork, like the ONNX session).
The cache hit rate is a PromQL ratio of two counters, e.g.
``sum(rate(heimdall_cache_requests_total{result="hit"}[5m])) / sum(rate(heimdall_cache_requests_total[5m]))``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["ServiceMetrics", "MetricsExporter", "prepare_multiprocess_dir", "STAGES"]

log = logging.getLogger(__name__)

STAGES = ("queue", "decode", "features", "inference", "store")
_CACHED_STAGES = ("queue", "decode", "store")
_STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def prepare_multiprocess_dir() -> Path:
    """The multiprocess folder: ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied), else a new one.

    Must run before prometheus_client is first imported in this process (it picks its value class
    at import time), and before the pool forks (children inherit the variable)."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        d = Path(configured)
        if d.exists():
            for f in d.glob("*.db"):  # stale values of a previous run would be summed in
                f.unlink()
        d.mkdir(parents=True, exist_ok=True)
    else:
        d = Path(tempfile.mkdtemp(prefix="heimdall-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    return d


class ServiceMetrics:
    """What a worker child records: fixes, rejections, cache lookups, stage times, batch sizes."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter, Histogram

        reg = REGISTRY if registry is None else registry
        self.fixes = Counter("heimdall_fixes", "Fixes returned, by origin", ["cached"], registry=reg)
        self.rejections = Counter("heimdall_rejections", "Payloads rejected, by error code", ["code"], registry=reg)
        self.cache = Counter("heimdall_cache_requests", "Prediction cache lookups", ["result"], registry=reg)
        self.store_errors = Counter("heimdall_store_errors", "Database writes that failed (retried)", registry=reg)
        self.stage = Histogram("heimdall_stage_seconds", "Time per fix in each stage", ["stage"],
                               buckets=_STAGE_BUCKETS_S, registry=reg)
        self.batch = Histogram("heimdall_batch_size", "heimdall.predict requests handled in one pass",
                               buckets=_BATCH_BUCKETS, registry=reg)

    def fixes_done(self, fixes: Iterable[dict[str, Any]]) -> None:
        for f in fixes:
            cached = bool(f.get("cached"))
            self.fixes.labels(cached="true" if cached else "false").inc()
            t = f.get("timings_ms") or {}
            for stage in (_CACHED_STAGES if cached else STAGES):  # a cache hit ran no features or model
                if stage in t:
                    self.stage.labels(stage=stage).observe(float(t[stage]) / 1e3)

    def cache_lookups(self, hits: int, misses: int) -> None:
        if hits:
            self.cache.labels(result="hit").inc(hits)
        if misses:
            self.cache.labels(result="miss").inc(misses)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsExporter:
    """``/metrics`` (all children, summed) and ``/healthz`` over HTTP, in a daemon thread."""

    def __init__(self, port: int, *, addr: str = "0.0.0.0", health: Callable[[], dict[str, Any]] | None = None,
                 multiprocess_dir: Path | None = None) -> None:
        from prometheus_client import CollectorRegistry, multiprocess

        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=str(multiprocess_dir) if multiprocess_dir else None)
        self.health = health or (lambda: {"status": "ok"})
        self.server = make_server(addr, port, self._app, server_class=_ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.port = self.server.server_port
        self.multiprocess_dir = multiprocess_dir
        self.remove_on_stop = False  #: remove the multiprocess folder on stop (one made by prepare_multiprocess_dir)
        self.thread = threading.Thread(target=self.server.serve_forever, name="heimdall-metrics", daemon=True)

    def start(self) -> "MetricsExporter":
        self.thread.start()
        log.info("metrics on :%d/metrics, health on :%d/healthz", self.port, self.port)
        return self

    def _app(self, environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body = generate_latest(self.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            try:
                state = self.health()
            except Exception as exc:  # the check itself failing is unhealthy, not a crash
                state = {"status": "error", "error": repr(exc)}
            ok = state.get("status") == "ok"
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [json.dumps(state).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"see /metrics and /healthz\n"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.remove_on_stop and self.multiprocess_dir is not None:
            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)
