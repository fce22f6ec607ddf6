"""What a worker child records for Prometheus: fixes, rejections, cache lookups, stage times, batches.

With ``HEIMDALL_METRICS_PORT`` set, the worker's main process (``worker_init``) points
prometheus-client's multiprocess mode at a fresh folder (:func:`prepare_multiprocess_dir`) before
the pool forks; children record through :class:`ServiceMetrics` (built after fork, like the ONNX
session) and :class:`~heimdall_inference.ops.exporter.MetricsExporter` serves every child's values.
The cache hit rate is a PromQL ratio of two counters, e.g.
``sum(rate(heimdall_cache_requests_total{result="hit"}[5m])) / sum(rate(heimdall_cache_requests_total[5m]))``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ServiceMetrics", "prepare_multiprocess_dir", "count_registry_fallback", "count_model_watch", "STAGES"]

STAGES = ("queue", "decode", "features", "inference", "store")
_CACHED_STAGES = ("queue", "decode", "store")
_STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def count_model_watch(result: str, registry: Any = None) -> None:
    """The main process' model watch: published (a new version for the children), refused, unreachable."""
    from prometheus_client import Counter

    Counter("heimdall_model_watch", "Checks of the served alias that found something: a new version published to "
            "the children, a version refused, the registry unreachable", ["result"], registry=registry
            ).labels(result=result).inc()


def count_registry_fallback(registry: Any = None) -> None:
    """A worker's main process started on its cached model because the registry did not answer."""
    from prometheus_client import Counter

    Counter("heimdall_model_registry_fallbacks", "Worker starts that served the cached model version because the "
            "model registry did not answer", registry=registry).inc()


def prepare_multiprocess_dir() -> Path:
    """The multiprocess folder: ``PROMETHEUS_MULTIPROC_DIR`` if set (emptied), else a new one.

    Runs before the pool forks (children inherit the variable). prometheus-client picks the class its
    metrics keep their values in when it is first imported; a package imported before this (Flower's
    ``celery flower`` plugin imports it whenever the ``celery`` command starts) would leave the children
    writing to memory nobody reads, so the choice is made again here."""
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
    if "prometheus_client.values" in sys.modules:
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # metrics made from now on write to the folder
    return d


class ServiceMetrics:
    """What a worker child records: fixes, rejections, cache lookups, stage times, batch sizes.

    ``registry=None`` registers nowhere: in multiprocess mode the values go to this process' files,
    which the exporter reads, so a replaced process context can make a new set without a clash.
    Pass a ``CollectorRegistry`` to read the values in-process (tests).
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        reg = registry
        self.fixes = Counter("heimdall_fixes", "Fixes returned, by origin", ["cached"], registry=reg)
        self.rejections = Counter("heimdall_rejections", "Payloads rejected, by error code", ["code"], registry=reg)
        self.cache = Counter("heimdall_cache_requests", "Prediction cache lookups", ["result"], registry=reg)
        self.store_errors = Counter("heimdall_store_errors", "Database writes that failed (retried)", registry=reg)
        self.results_unwritten = Counter("heimdall_results_unwritten", "Task results not written because the result "
                                         "backend did not answer (their fixes are stored)", registry=reg)
        self.stage = Histogram("heimdall_stage_seconds", "Time per fix in each stage", ["stage"],
                               buckets=_STAGE_BUCKETS_S, registry=reg)
        self.batch = Histogram("heimdall_batch_size", "heimdall.predict requests handled in one pass",
                               buckets=_BATCH_BUCKETS, registry=reg)
        self.model = Gauge("heimdall_model_info", "The model this child serves (1), by name, version, alias and where "
                           "it came from (registry, cache: the registry did not answer at start, file, shipped)",
                           ["name", "version", "alias", "source"], registry=reg, multiprocess_mode="liveall")

        self.swaps = Counter("heimdall_model_swaps", "Model swaps in this child, by result (swapped; failed: the new "
                             "version did not load, the old one serves)", ["result"], registry=reg)
        self._model_labels: dict[str, str] | None = None

    def model_loaded(self, name: str, version: str, alias: str | None, source: str) -> None:
        """This child serves this model now (the one it served before reads 0)."""
        if self._model_labels is not None:
            self.model.labels(**self._model_labels).set(0)
        self._model_labels = {"name": name, "version": version, "alias": alias or "", "source": source}
        self.model.labels(**self._model_labels).set(1)

    def swap_done(self, result: str) -> None:
        self.swaps.labels(result=result).inc()

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
