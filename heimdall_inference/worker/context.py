"""What one worker process holds, as one object: :class:`ProcessContext`.

* In the **main process** (built at ``worker_init``): the settings and the metrics exporter.
* In each **pool child** (built at ``worker_process_init``, after fork): the settings, the warm
  :class:`~.service.Service` (ONNX session, feature plan, database pool, cache client) and the
  child's metrics. The solo pool sends that signal in the main process, whose context gains the
  service; the threads pool sends nothing, and the service is built on first use.

A context is replaced as a whole (:func:`install`): the new one is complete before any task sees
it, and the old one is closed afterwards (what the new one shares with it, such as the metrics, is
kept). A context belongs to the process that built it: at fork the child drops the context it
inherited without closing it (its connections and its exporter thread are the parent's), and gets
a fresh lock.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from ..core.localizer import Localizer
from ..core.payload import Limits
from ..core.session import SessionOptions
from ..ops.exporter import MetricsExporter
from ..ops.metrics import ServiceMetrics
from ..registry.resolve import ModelSet, ResolvedModel
from ..registry.routes import ref_of
from ..registry.uri import parse_model_uri
from ..settings import Settings, process_settings
from ..store import open_store
from ..store.cache import FixCache
from .routing import Arm, Router
from .service import Service

__all__ = ["ProcessContext", "build_service", "build_child_context", "rebuild_service", "current", "parent",
           "current_service", "install", "served_models",
           "metrics_enabled"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessContext:
    """Everything one worker process holds; replace it as a whole, never piece by piece."""

    settings: Settings
    service: Service | None = None  #: pool children: the warm pipeline around the model
    metrics: ServiceMetrics | None = None  #: pool children: counters and histograms (multiprocess files)
    exporter: MetricsExporter | None = None  #: main process: /metrics and /healthz
    models: ModelSet | None = None  #: what this process serves (the main process resolved it; children load it)
    model_error: str | None = None  #: main process: why no model could be resolved (the worker then refuses to start)
    model_state: Path | None = None  #: the file the main process publishes model swaps in (children watch it)
    model_seen: tuple[int, int] | None = None  #: children: the state file's (inode, mtime) last acted on
    watcher: Any = None  #: main process: the ModelWatcher thread
    run_dir: Path | None = None  #: where children say which models they serve (/readyz reads it); the main process' own
    pid: int = field(default_factory=os.getpid)  #: the process that built it (and may close it)

    def with_(self, **changes: Any) -> "ProcessContext":
        """A new context for this process with ``changes`` (e.g. another service on a model swap)."""
        if self.pid != os.getpid():
            raise RuntimeError("a context inherited from another process cannot be extended: build a new one")
        return replace(self, **changes)

    def close(self, keep: "ProcessContext | None" = None) -> None:
        """Release what this context holds, except what ``keep`` shares; a no-op in another process."""
        if self.pid != os.getpid():
            return
        if self.service is not None and (keep is None or keep.service is not self.service):
            self.service.close(keep=keep.service if keep is not None else None)
        if self.watcher is not None and (keep is None or keep.watcher is not self.watcher):
            self.watcher.stop()
        if self.exporter is not None and (keep is None or keep.exporter is not self.exporter):
            self.exporter.stop()


def metrics_enabled(settings: Settings) -> bool:
    """Children record metrics when the worker exports them (the parent set up the multiprocess folder)."""
    return settings.metrics_port > 0 and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _localizer(settings: Settings, model: ResolvedModel | None, fetch: Any) -> Localizer:
    path = model.path if model is not None else (settings.model_path or None)
    return Localizer(path, session_options=SessionOptions(intra_op_threads=settings.onnx_threads,
                                                          providers=settings.providers),
                     limits=Limits(max_payload_bytes=settings.max_payload_bytes), fetch_iq_ref=fetch,
                     name=model.name if model is not None else None,
                     version=model.version if model is not None else None)


def _arms(settings: Settings, models: ModelSet | None, fetch: Any, reuse: Router | None = None,
          warm: bool = False, interrupts: tuple[type[BaseException], ...] = (),
          metrics: ServiceMetrics | None = None) -> Router:
    """The router over every model in ``models``: the served one (its failure to load is raised), each other
    ref's (one that does not load, or takes other inputs than the served one, is logged and left out: its share
    goes to the served model), and each band model (one that does not load is raised like the served one's; one
    whose payloads another decoder would need, or whose bands overlap a model before it, is logged and left out).
    A version already loaded in ``reuse`` keeps its session; a new one is loaded beside it (and warmed, ``warm``)."""
    loaded: dict[tuple[Any, ...], Arm] = {}
    if reuse is not None:
        for arm in (*reuse.arms, *reuse.bands):
            loaded[_identity(arm.localizer)] = arm

    def arm(model: ResolvedModel | None, ref: str | None) -> Arm:
        key = _model_identity(model) if model is not None else None
        old = loaded.get(key) if key is not None else None
        if old is not None:
            loc = old.localizer
        else:
            loc = _localizer(settings, model, fetch)
            if warm:
                loc.warm()
            loaded[_identity(loc)] = Arm(loc)
        return Arm(loc, alias=model.alias if model is not None else None, ref=ref,
                   source=model.source if model is not None else "shipped")

    primary = arm(models.primary if models else None, None)
    others: dict[str, Arm] = {}
    for ref, model in (models.others if models else ()):
        before = reuse.arm(ref) if reuse is not None else None
        try:
            a = arm(model, ref)
        except interrupts:  # a soft time limit ends the pass; the swap is tried again on the next one
            raise
        except Exception as exc:
            if metrics is not None:
                metrics.swap_done("failed")
            log.error("model %s (version %s) does not load here: %s; %s", ref, model.version, exc,
                      f"version {before.version} keeps serving it" if before else "its requests go to the served model")
            if before is not None:
                others[ref] = before
            continue
        if not a.localizer.same_inputs(primary.localizer):
            log.error("model %s (version %s) takes other inputs (receivers, signal or features) than the served "
                      "version %s; it is not served beside it", ref, model.version, primary.version)
            continue
        others[ref] = a  # one session per file: a ref on the served version (or on another ref's) shares it
    bands: list[Arm] = []
    for uri, model in (models.bands if models else ()):
        if primary.localizer.session.sha256 == (model.sha256 or _file_sha256(model.path)):
            continue  # the served model itself (HEIMDALL_BAND_MODELS=shipped beside the shipped model)
        a = arm(model, None)
        taken = [primary, *bands]
        overlap = next((t for t in taken if _overlap(t.localizer.spec.bands_hz, a.localizer.spec.bands_hz)), None)
        if overlap is not None:
            (log.info if model.source == "shipped" else log.error)(
                "band model %s (%s version %s, bands %s) is not served: %s version %s serves those frequencies", uri,
                a.name, a.version, _mhz(a.localizer.spec.bands_hz), overlap.name, overlap.version)
            continue
        if not a.localizer.same_payloads(primary.localizer):
            log.error("band model %s (%s version %s) takes other payloads (receivers, sample rate or snippet length) "
                      "than the served model; it is not served beside it", uri, a.name, a.version)
            continue
        bands.append(a)
    primary_ref = ref_of(parse_model_uri(models.primary.uri)) if models and models.primary.uri else None
    return Router(primary, others, settings.routes(), primary_ref=primary_ref, bands=bands)


def _overlap(a: tuple[tuple[float, float], ...], b: tuple[tuple[float, float], ...]) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def _mhz(bands: tuple[tuple[float, float], ...]) -> str:
    return ", ".join(f"{lo / 1e6:g}-{hi / 1e6:g} MHz" for lo, hi in bands)


def _file_sha256(path: Path | None) -> str:
    from ..core.session import default_model_path
    from ..registry.cache import file_sha256

    return file_sha256(path or default_model_path())


def served_models(service: Service | None) -> dict[str, Any]:
    """What a child serves, as its readiness marker says: the served version and alias, and each other ref's."""
    if service is None:
        return {}
    r = service.router
    return {"version": r.primary.version, "alias": r.primary.alias,
            **({"others": {a.ref: a.version for a in r.arms[1:] if a.ref}} if r.routes.active else {}),
            **({"bands": {a.name: a.version for a in r.bands}} if r.bands else {})}


def _identity(loc: Localizer) -> tuple[Any, ...]:
    return (loc.version, loc.session.sha256)


def _model_identity(model: ResolvedModel) -> tuple[Any, ...] | None:
    return (model.version, model.sha256) if model.sha256 and model.version else None


def build_service(settings: Settings, metrics: ServiceMetrics | None = None,
                  models: ModelSet | None = None) -> Service:
    """The warm Service for one process, from settings (loads the models: call it after fork). ``models`` is
    what the worker's main process resolved at start; without it, ``model_path`` (else the shipped model)."""
    fetch = None
    if settings.s3_endpoint_url:
        from ..store.objectstore import S3Fetcher

        fetch = S3Fetcher(settings.s3_endpoint_url)
    router = _arms(settings, models, fetch, interrupts=(SoftTimeLimitExceeded,), metrics=metrics)
    store = open_store(settings.database_url, schema=settings.db_schema, pool_max=settings.db_pool_max,
                       statement_timeout_ms=settings.db_statement_timeout_ms)
    cache = FixCache(settings.cache_url, ttl_s=settings.cache_ttl_s, prefix=settings.redis_key_prefix) \
        if settings.cache_url else None
    if metrics is not None:
        metrics.models_loaded((a.name, a.version, a.alias, a.source) for a in (*router.arms, *router.bands))
    # a soft time limit ends the whole pass (its requests retry), it is never one request's outcome
    return Service(router.primary.localizer, store, cache, metrics=metrics, interrupts=(SoftTimeLimitExceeded,),
                   router=router)


def build_child_context(settings: Settings, metrics: ServiceMetrics | None = None,
                        models: ModelSet | None = None, model_state: Path | None = None) -> ProcessContext:
    """A pool child's context: metrics (when exported) and the warm service."""
    if metrics is None and metrics_enabled(settings):
        metrics = ServiceMetrics(registry=None)  # multiprocess mode: the files are the registry
    seen = _state_key(model_state)  # first the key, then the file: a swap published in between is seen later
    if seen is not None:
        from .model_swap import read_state

        try:
            models = read_state(model_state)  # the main process' latest word, even one published since the fork
        except (OSError, ValueError, TypeError, KeyError):
            log.exception("unreadable model state file %s; loading the models inherited at fork", model_state)
    return ProcessContext(settings=settings, service=build_service(settings, metrics, models), metrics=metrics,
                          models=models, model_state=model_state, model_seen=seen)


def _state_key(path: Path | None) -> tuple[int, int] | None:
    """What a child has acted on: the model state file as it is when the child loads its model."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def rebuild_service(ctx: ProcessContext, models: ModelSet) -> Service:
    """A service on ``models`` beside ``ctx``'s, sharing its database pool, cache client, metrics and the sessions
    of the versions that did not change; each new session is warmed (one run) before it is returned."""
    old = ctx.service
    if old is None:
        return build_service(ctx.settings, ctx.metrics, models)
    router = _arms(ctx.settings, models, old.localizer.decoder.fetch_iq_ref, reuse=old.router, warm=True,
                   interrupts=old.interrupts, metrics=ctx.metrics)
    if ctx.metrics is not None:
        ctx.metrics.models_loaded((a.name, a.version, a.alias, a.source) for a in (*router.arms, *router.bands))
    return Service(router.primary.localizer, old.store, old.cache, metrics=ctx.metrics, interrupts=old.interrupts,
                   router=router)


class _Holder:
    """The one slot for this process' context (and, in a forked child, the parent's, read-only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.context: ProcessContext | None = None
        self.parent: ProcessContext | None = None


_holder = _Holder()


def _after_fork_in_child() -> None:
    """A forked child starts with no context and a lock no other thread can be holding; the parent's context
    stays readable (:func:`parent`), never closed or extended here."""
    _holder.lock = threading.Lock()
    _holder.parent = _holder.context if _holder.context is not None else _holder.parent
    _holder.context = None


def parent() -> ProcessContext | None:
    """In a forked pool child, the context of the process that forked it (what the main process resolved)."""
    ctx = _holder.parent
    return ctx if ctx is not None and ctx.pid != os.getpid() else None


os.register_at_fork(after_in_child=_after_fork_in_child)


def current() -> ProcessContext | None:
    """This process' context, or None before one is installed (or one inherited from a parent)."""
    ctx = _holder.context
    return ctx if ctx is not None and ctx.pid == os.getpid() else None


def install(ctx: ProcessContext | None) -> ProcessContext | None:
    """Make ``ctx`` this process' context; the previous one is closed (shared parts kept). Returns it."""
    with _holder.lock:
        old, _holder.context = _holder.context, ctx
    if old is not None and old is not ctx:
        old.close(keep=ctx)
    return old


def current_service() -> Service:
    """This process' Service; built on first use where no signal built it (the threads pool). Where a pass
    begins: a model swap the main process published is taken here (:mod:`.model_swap`)."""
    ctx = current()
    if ctx is not None and ctx.service is not None:
        if ctx.model_state is not None:
            from .model_swap import swapped

            ctx = swapped(ctx, rebuild_service, install)
        return ctx.service  # type: ignore[return-value]
    with _holder.lock:
        ctx = current()
        if ctx is None or ctx.service is None:
            base = ctx or ProcessContext(settings=process_settings())
            up = parent()
            built = build_child_context(base.settings, base.metrics, base.models or (up.models if up else None),
                                        base.model_state or (up.model_state if up else None))
            ctx = base.with_(service=built.service, metrics=built.metrics, models=built.models,
                             model_state=built.model_state, model_seen=built.model_seen,
                             run_dir=base.run_dir or (up.run_dir if up else None))
            _holder.context = ctx
            if ctx.run_dir is not None:  # built late (the signal's build failed): readiness must still see it
                from ..ops.health import mark_child_ready

                mark_child_ready(ctx.run_dir, served_models(ctx.service))
    return ctx.service  # type: ignore[return-value]
