"""One HTTP endpoint per worker: ``/metrics`` (every child's values, summed), ``/healthz`` and ``/readyz``.

``/metrics`` is prometheus-client's own WSGI app over a ``MultiProcessCollector`` (content
negotiation, compression and ``name[]`` filtering included) and the main process' own collectors
(:mod:`.collectors`: queues, in-flight tasks); ``/healthz`` answers 200 ``{"status": "ok", ...}`` while
the liveness check says ok, ``/readyz`` 200 ``{"status": "ready", ...}`` while the readiness check
does (:mod:`.health`), else 503. Served by the standard library's WSGI server (one thread per request)
in a daemon thread of the worker's main process.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

__all__ = ["MetricsExporter"]

log = logging.getLogger(__name__)

Health = Callable[[], dict[str, Any]]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # scrapes every few seconds: not worth a log line
        pass


class MetricsExporter:
    """``/metrics`` and ``/healthz`` over HTTP, in a daemon thread; ``start()`` then ``stop()``."""

    def __init__(self, port: int, *, addr: str = "0.0.0.0", health: Health | None = None,
                 ready: Health | None = None, multiprocess_dir: Path | None = None, remove_dir_on_stop: bool = False,
                 collectors: Iterable[Any] = (), before_scrape: Callable[[], None] | None = None) -> None:
        from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess

        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=str(multiprocess_dir) if multiprocess_dir else None)
        for c in collectors:
            self.registry.register(c)
        self._metrics_app = make_wsgi_app(self.registry)
        self.health = health or (lambda: {"status": "ok"})
        self.ready = ready or self.health
        self.before_scrape = before_scrape  #: e.g. forget the files of dead children
        self.server = make_server(addr, port, self._app, server_class=_ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.port: int = self.server.server_port
        self.multiprocess_dir = multiprocess_dir
        self.remove_dir_on_stop = remove_dir_on_stop  #: remove the folder on stop (one this worker made)
        self.thread = threading.Thread(target=self.server.serve_forever, name="heimdall-metrics", daemon=True)

    def start(self) -> "MetricsExporter":
        self.thread.start()
        log.info("metrics on :%d/metrics, health on :%d/healthz", self.port, self.port)
        return self

    def _app(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            if self.before_scrape is not None:
                try:
                    self.before_scrape()
                except Exception:  # housekeeping must never cost a scrape
                    log.debug("before_scrape failed", exc_info=True)
            return self._metrics_app(environ, start_response)
        if path in ("/healthz", "/readyz"):
            check, good = (self.health, "ok") if path == "/healthz" else (self.ready, "ready")
            try:
                state = check()
            except Exception as exc:  # the check itself failing is unhealthy, not a crash
                state = {"status": "error", "error": repr(exc)}
            ok = state.get("status") in (good, "ok")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [json.dumps(state).encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"see /metrics, /healthz and /readyz\n"]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.remove_dir_on_stop and self.multiprocess_dir is not None:
            shutil.rmtree(self.multiprocess_dir, ignore_errors=True)
