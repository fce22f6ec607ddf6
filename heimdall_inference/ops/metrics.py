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

__all__ = ["ServiceMetrics", "prepare_multiprocess_dir", "count_registry_fallback", "count_model_watch", "STAGES",
           "forget_dead_processes", "WATCH_RESULTS"]

STAGES = ("queue", "decode", "features", "inference", "store")
_CACHED_STAGES = ("queue", "decode", "store")
_STAGE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS_S = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DISTANCE_BUCKETS_M = (100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 2.5e4, 5e4, 1e5, 2.5e5)


WATCH_RESULTS = ("published", "refused", "unreachable", "absent", "error")


def count_model_watch(result: str | None, registry: Any = None) -> None:
    """The main process' model watch: published (a new version for the children), refused, unreachable, absent (an
    experiment arm not in the registry), error. ``None``: create every result's series at 0 (at start, so that
    ``increase()`` sees the first one)."""
    from prometheus_client import Counter

    c = Counter("heimdall_model_watch", "Checks of the served aliases that found something: a new version published "
                "to the children, a version refused, the registry unreachable, an experiment arm absent, an error",
                ["result"], registry=registry)
    for r in (WATCH_RESULTS if result is None else (result,)):
        child = c.labels(result=r)
        if result is not None:
            child.inc()


def count_registry_fallback(registry: Any = None) -> None:
    """A worker's main process started on its cached model because the registry did not answer."""
    from prometheus_client import Counter

    Counter("heimdall_model_registry_fallbacks", "Worker starts that served the cached model version because the "
            "model registry did not answer", registry=registry).inc()


def forget_dead_processes(folder: Path, alive: set[int]) -> None:
    """Drop the live-gauge files of processes that are gone (a child recycled, killed by a time limit or the OOM
    killer): their ``heimdall_model_info`` would otherwise read 1 for the model they served, for ever."""
    from prometheus_client import multiprocess

    pids = set()
    for f in folder.glob("gauge_live*_*.db"):
        try:
            pids.add(int(f.stem.rsplit("_", 1)[1]))
        except ValueError:
            continue
    for pid in pids - alive:
        multiprocess.mark_process_dead(pid, str(folder))


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
        self.fixes = Counter("heimdall_fixes", "Fixes, by the model (name: one per band) and version that computed "
                             "them, role (served: returned and stored; shadow: stored beside a served fix, never "
                             "returned) and origin (cached)", ["model", "model_version", "role", "cached"], registry=reg)
        self.quality = Counter("heimdall_fix_quality", "Served fixes by model (one per band) and quality grade (good, "
                               "fair, poor: the fix's quality field)", ["model", "grade"], registry=reg)
        self.shadow_errors = Counter("heimdall_shadow_errors", "Shadow runs that gave no fix (the served fix is "
                                     "unaffected)", registry=reg)
        self.shadow_distance = Histogram("heimdall_shadow_distance_meters", "Distance between a served fix and the "
                                         "shadow model's fix beside it", buckets=_DISTANCE_BUCKETS_M, registry=reg)
        self.rejections = Counter("heimdall_rejections", "Payloads rejected, by error code", ["code"], registry=reg)
        self.cache = Counter("heimdall_cache_requests", "Prediction cache lookups", ["result"], registry=reg)
        self.store_errors = Counter("heimdall_store_errors", "Database writes that failed (retried)", registry=reg)
        self.results_unwritten = Counter("heimdall_results_unwritten", "Task results not written because the result "
                                         "backend did not answer (their fixes are stored)", registry=reg)
        self.stage = Histogram("heimdall_stage_seconds", "Time per fix in each stage", ["stage"],
                               buckets=_STAGE_BUCKETS_S, registry=reg)
        self.latency = Histogram("heimdall_fix_latency_seconds", "A served fix from the producer's send to its row "
                                 "stored: the sum of its stages (queue, decode, features, inference, store)",
                                 buckets=_LATENCY_BUCKETS_S, registry=reg)
        self.batch = Histogram("heimdall_batch_size", "heimdall.predict requests handled in one pass",
                               buckets=_BATCH_BUCKETS, registry=reg)
        self.model = Gauge("heimdall_model_info", "The model this child serves (1), by name, version, alias and where "
                           "it came from (registry, cache: the registry did not answer at start, file, shipped)",
                           ["name", "version", "alias", "source"], registry=reg, multiprocess_mode="liveall")

        self.swaps = Counter("heimdall_model_swaps", "Model swaps in this child, by result (swapped; failed: the new "
                             "version did not load, the old one serves)", ["result"], registry=reg)
        for result in ("swapped", "failed"):  # every series from 0: increase() sees the first swap
            self.swaps.labels(result=result)
        self._model_labels: list[dict[str, str]] = []

    def model_loaded(self, name: str, version: str, alias: str | None, source: str) -> None:
        """This child serves this model now, alone (the ones it served before read 0)."""
        self.models_loaded([(name, version, alias, source)])

    def models_loaded(self, models: Iterable[tuple[str, str, str | None, str]]) -> None:
        """This child serves these models now, as (name, version, alias, source); the ones it served before read 0."""
        labels = [{"name": n, "version": v, "alias": a or "", "source": s} for n, v, a, s in models]
        for old in self._model_labels:
            if old not in labels:
                self.model.labels(**old).set(0)
        self._model_labels = labels
        for now in labels:
            self.model.labels(**now).set(1)

    def swap_done(self, result: str) -> None:
        self.swaps.labels(result=result).inc()

    def fixes_done(self, fixes: Iterable[dict[str, Any]]) -> None:
        """Served fixes: counted by model version and origin; their stage times observed."""
        for f in fixes:
            cached = bool(f.get("cached"))
            self.fixes.labels(model=str(f["model"]["name"]), model_version=str(f["model"]["version"]), role="served",
                              cached="true" if cached else "false").inc()
            grade = (f.get("quality") or {}).get("grade")
            if grade:
                self.quality.labels(model=str(f["model"]["name"]), grade=grade).inc()
            t = f.get("timings_ms") or {}
            total = 0.0
            for stage in (_CACHED_STAGES if cached else STAGES):  # a cache hit ran no features or model
                if stage in t:
                    self.stage.labels(stage=stage).observe(float(t[stage]) / 1e3)
                    total += float(t[stage])
            self.latency.observe(total / 1e3)

    def shadow_stored(self, served: dict[str, Any], shadow: dict[str, Any]) -> None:
        """A shadow model's fix stored beside a served one: counted, and how far apart they are."""
        self.fixes.labels(model=str(shadow["model"]["name"]), model_version=str(shadow["model"]["version"]), role="shadow",
                          cached="true" if shadow.get("cached") else "false").inc()
        a, b = served["position"], shadow["position"]
        self.shadow_distance.observe(((a["east_m"] - b["east_m"]) ** 2 + (a["north_m"] - b["north_m"]) ** 2) ** 0.5)

    def shadow_failed(self) -> None:
        self.shadow_errors.inc()

    def cache_lookups(self, hits: int, misses: int) -> None:
        if hits:
            self.cache.labels(result="hit").inc(hits)
        if misses:
            self.cache.labels(result="miss").inc(misses)
