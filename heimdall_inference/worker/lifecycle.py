"""The worker's per-process set-up and tear-down, as Celery signal handlers.

* ``worker_init`` (main process, before the pool forks): nothing at all on an untested Celery
  (the :class:`~.celery_internals.VersionGuard` bootstep stops the worker right after); else
  pin glibc's mmap threshold (:mod:`~heimdall_inference.ops.memory`: memory stays flat after large
  messages; the children inherit it), declare ``heimdall.dead`` so that dead letters have somewhere to go,
  declare the live and batch queues (one clear error, and the queue consumed as it is, when one exists
  with other arguments such as an older delivery limit); with
  ``HEIMDALL_METRICS_PORT``, prepare prometheus-client's multiprocess folder and start the exporter
  (``/metrics``, ``/healthz``); install the main process' :class:`~.context.ProcessContext`.
  Then resolve the model to serve (:mod:`~heimdall_inference.registry`: a file, or an MLflow alias
  downloaded once per host and verified); :class:`ModelGuard`, a worker bootstep, stops a worker that
  has none before it consumes anything.
* ``celeryd_after_setup`` (main process, once logging is set up, before the pool starts): log every
  endpoint and warn about each one that does not answer (:mod:`~heimdall_inference.ops.endpoints`).
* ``worker_process_init`` (each prefork child, after fork; the solo pool sends it in the main
  process): the warm service (the ONNX session is created here, never in the parent: sessions
  inherited across fork can crash) and its metrics, added to this process' context. Celery kills a
  child whose handler takes more than a few seconds, so this only loads the model (~0.1 s), opens
  the database pool without waiting and connects the cache lazily. The threads pool sends nothing:
  its service is built on first use.
* ``worker_process_shutdown`` / ``worker_shutdown``: close the context (database pool, cache
  client, exporter).

Settings are :func:`~heimdall_inference.settings.process_settings`: read once in the main process,
inherited by the children.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Any

from pathlib import Path

from celery import bootsteps
from celery.worker.control import control_command
from celery.signals import (after_setup_logger, after_setup_task_logger, celeryd_after_setup, worker_init,
                            worker_process_init, worker_process_shutdown, worker_shutdown)

from ..errors import ConfigError, HeimdallError, ModelLoadError
from ..ops.endpoints import check_endpoints
from ..ops.exporter import MetricsExporter
from ..ops.collectors import BrokerCollector, QueueProbe, WorkerCollector
from ..ops.health import CachedCheck, clear_child_ready, mark_child_ready, worker_health, worker_readiness
from ..store import probe_database
from ..ops.logs import configure_logging
from ..ops.cpu import one_thread_per_process
from ..ops.memory import pin_mmap_threshold
from ..ops.metrics import count_model_watch, count_registry_fallback, forget_dead_processes, prepare_multiprocess_dir
from ..registry.resolve import ModelSet, ResolvedModel, default_cache_dir, ref_uri, resolve_model
from ..registry.routes import ref_of
from ..registry.uri import parse_model_uri
from ..settings import process_settings
from .celery_internals import check_versions, in_flight
from .context import ProcessContext, build_child_context, current, install, parent, served_models
from .model_swap import RELOAD_COMMAND, ModelWatcher
from .topology import dead_queue, is_amqp, work_queues

__all__ = ["ModelGuard"]

log = logging.getLogger(__name__)


def _declare_dead_letter_queue(worker: Any) -> None:
    """Declare heimdall.dead once per worker so that dead letters have somewhere to go."""
    if not is_amqp(str(worker.app.conf.broker_url)):
        return
    try:
        with worker.app.connection_for_write() as conn:
            dead_queue()(conn.default_channel).declare()
    except Exception:
        log.exception("could not declare heimdall.dead; dead letters would be dropped")


def _declare_work_queues(worker: Any, settings: Any) -> None:
    """Declare the live and batch queues with the configured arguments; if one already exists with others
    (a changed HEIMDALL_DELIVERY_LIMIT: a queue argument cannot change), say so in one clear line and consume
    that queue as it is, instead of failing every declare and never starting."""
    if not is_amqp(str(worker.app.conf.broker_url)):
        return
    for wanted in work_queues(settings):
        try:
            with worker.app.connection_for_write() as conn:
                try:
                    wanted(conn.default_channel).declare()
                except conn.channel_errors as exc:
                    log.error("%s exists with other arguments than these settings ask for (HEIMDALL_DELIVERY_LIMIT=%d): "
                              "%s. A queue argument cannot change, so this worker consumes the queue as it is. To lower "
                              "the limit, set a policy (RabbitMQ applies the lower of the two): rabbitmqctl set_policy "
                              "heimdall-delivery-limit '^%s$' '{\"delivery-limit\": %d}' --apply-to quorum_queues; to "
                              "raise it, delete the queue once it is empty and restart the workers",
                              wanted.name, settings.delivery_limit, exc, wanted.name.replace(".", "\\."),
                              settings.delivery_limit)
                    for q in worker.app.amqp.queues.values():
                        if q.name == wanted.name:
                            q.no_declare = True  # the consumer would declare it again, and fail again
        except Exception:  # the broker is not reachable yet: the consumer's own connection retries say so
            log.warning("could not check the queue %s at start", wanted.name, exc_info=True)


def _resolver(settings: Any, refused: set[tuple[str, str]] | None = None, *, band: bool = False) -> Any:
    """``resolve(ref=None)``: the model HEIMDALL_MODEL_URI (else HEIMDALL_MODEL_PATH, else the shipped one) names
    now, or ``ref`` (an alias or version of the same registered model, named by the routes). With ``band``,
    ``resolve(uri)`` resolves a band model's own URI (HEIMDALL_BAND_MODELS)."""
    def registry() -> Any:
        from ..registry.rest import RestRegistry

        return RestRegistry(timeout_s=settings.registry_timeout_s)

    uri = settings.model_uri or settings.model_path
    cache_dir = Path(settings.model_cache_dir) if settings.model_cache_dir else default_cache_dir(settings.data_dir)
    if band:
        return lambda band_uri: resolve_model(band_uri, cache_dir=cache_dir, registry=registry, refused=refused)
    return lambda ref=None: resolve_model(ref_uri(uri, ref) if ref else uri, cache_dir=cache_dir, registry=registry,
                                          refused=refused)


def _resolve_models(settings: Any, *, exported: bool) -> tuple[ModelSet | None, str | None]:
    """What this worker serves, or why it serves nothing: its own model and every band model must resolve; another
    model its routes name that does not (its alias not set yet, a version refused) is left out, with a warning (its
    share goes to the worker's own model until the watch finds it)."""
    resolve = _resolver(settings)
    resolve_band = _resolver(settings, band=True)
    bands: dict[str, ResolvedModel] = {}
    try:
        model = resolve()
        for uri in settings.band_model_uris():
            bands[uri] = resolve_band(uri)
    except HeimdallError as exc:
        log.error("no model to serve: %s; this worker does not start (it takes no task it cannot serve)", exc)
        return None, str(exc)
    except Exception as exc:  # a bug or an unexpected library error: the worker must not serve another model
        log.exception("no model to serve: resolving %s failed", settings.model_uri or settings.model_path)
        return None, f"{type(exc).__name__}: {exc}"
    for m in (model, *bands.values()):
        if m.source == "cache" and exported:
            count_registry_fallback()
    log.info("model: %s", {k: v for k, v in model.label().items() if v})
    for uri, m in bands.items():
        log.info("band model %s: %s", uri, {k: v for k, v in m.label().items() if v and k != "uri"})
    others: dict[str, ResolvedModel] = {}
    for ref in settings.routes().refs(ref_of(parse_model_uri(model.uri))):
        try:
            others[ref] = resolve(ref)
        except Exception as exc:  # not fatal: the worker's own model serves this ref's requests meanwhile
            log.warning("model %s is not served at start (%s); its requests go to version %s until it resolves",
                        ref, exc, model.version)
            continue
        log.info("model %s: version %s (%s)", ref, others[ref].version, others[ref].source)
    return ModelSet.of(model, others, bands), None


class ModelGuard(bootsteps.Step):
    """Worker bootstep: no model, no consumption. A worker whose model could not be resolved at
    ``worker_init`` (registry refusing, nothing cached, a checksum or contract that does not hold) stops
    here, before its consumer or pool start, instead of taking tasks off the queue only to fail them."""

    name = "heimdall model guard"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        ctx = current()
        if ctx is not None and ctx.models is None and ctx.model_error:
            raise ModelLoadError(f"no model to serve: {ctx.model_error}")
        if ctx is None and process_settings().model_uri:  # worker_init did not finish: never fall back silently
            raise ModelLoadError("no model to serve: the worker's start-up did not resolve HEIMDALL_MODEL_URI "
                                 "(see the errors above)")
        super().__init__(parent, **kwargs)


def _start_exporter(worker: Any, settings: Any, run_dir: Path) -> MetricsExporter | None:
    """The multiprocess folder (before the pool forks: children inherit the variable) and the exporter, with the
    main process' own collectors (queues from the broker, in-flight tasks) and its probes."""
    try:
        own_folder = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        folder = prepare_multiprocess_dir()
        queues = [q.name for q in work_queues(settings)] + [dead_queue().name]
        probe = QueueProbe(lambda: _probe_connection(worker.app), queues) if is_amqp(settings.broker_url) else None
        collectors: list[Any] = [WorkerCollector(lambda: worker_health(worker)["children"], in_flight)]
        if probe is not None:
            collectors.append(BrokerCollector(probe))
        database = CachedCheck(lambda: probe_database(settings.database_url))

        def forget_dead() -> None:
            forget_dead_processes(folder, {os.getpid(), *(int(p) for p in (worker.pool.info or {}).get("processes", []))})

        return MetricsExporter(settings.metrics_port, health=lambda: worker_health(worker),
                               ready=lambda: worker_readiness(worker, run_dir, database), multiprocess_dir=folder,
                               remove_dir_on_stop=own_folder, collectors=collectors,
                               before_scrape=forget_dead).start()
    except Exception:  # no metrics is bad; no worker would be worse
        log.exception("could not start the metrics exporter on port %d", settings.metrics_port)
        return None


def _probe_connection(app: Any, timeout_s: float = 2.0) -> Any:
    """A broker connection of the exporter's own, whose every socket operation gives up after ``timeout_s``."""
    options = {**(app.conf.broker_transport_options or {}), "read_timeout": timeout_s, "write_timeout": timeout_s}
    return app.connection_for_read(connect_timeout=timeout_s, transport_options=options)


@worker_init.connect
def _init_main(sender: Any = None, **_: Any) -> None:
    """The main process: dead-letter queue, metrics exporter, the process context."""
    if sender is None:
        return
    try:
        check_versions()
    except ConfigError:
        return  # the VersionGuard bootstep stops this worker next; leave nothing behind before it does
    settings = process_settings()
    pin_mmap_threshold()
    one_thread_per_process()  # children inherit it (and set it again at their own start)
    _declare_dead_letter_queue(sender)
    _declare_work_queues(sender, settings)
    run_dir = Path(tempfile.mkdtemp(prefix="heimdall-run-")) if settings.metrics_port > 0 else None
    exporter = _start_exporter(sender, settings, run_dir) if run_dir is not None else None
    models, error = _resolve_models(settings, exported=exporter is not None)
    ctx = ProcessContext(settings=settings, exporter=exporter, models=models, model_error=error, run_dir=run_dir)
    install(ctx)
    if models is not None and (models.primary.alias or settings.routes().active or
                               any(m.alias for _, m in models.bands)):
        _start_watch(ctx, exported=exporter is not None)


def _start_watch(ctx: ProcessContext, *, exported: bool) -> None:
    """Watch the served aliases (HEIMDALL_MODEL_POLL_S, and the reload broadcast); children follow the state file."""
    state = Path(tempfile.mkdtemp(prefix="heimdall-model-")) / "model.json"
    refused: set[tuple[str, str]] = set()
    primary = ctx.models.primary
    refs = ctx.settings.routes().refs(ref_of(parse_model_uri(primary.uri)))
    if exported:
        count_model_watch(None)  # every result's series from 0: an alert's increase() sees the first one
    bands = tuple(uri for uri, m in ctx.models.bands if m.alias)  # files and pinned versions do not move
    watcher = ModelWatcher(ctx.models, state, _resolver(ctx.settings, refused=refused), refs=refs,
                           interval_s=ctx.settings.model_poll_s,
                           count=count_model_watch if exported else (lambda result: None),
                           bands=bands, resolve_band=_resolver(ctx.settings, refused=refused, band=True))
    install(ctx.with_(model_state=state, watcher=watcher.start()))
    log.info("watching %s%s for a new version (every %s s, and on heimdall-inference model reload)", primary.uri,
             "".join(f", {r}" for r in (*refs, *bands)), ctx.settings.model_poll_s or "never")


@control_command(name=RELOAD_COMMAND)
def _reload(state: Any, **_: Any) -> dict[str, Any]:
    """``heimdall-inference model reload``: check the served aliases now (the swap itself happens in the
    background, and in each child between batches)."""
    ctx = current()
    if ctx is None or ctx.watcher is None:
        return {"ok": False, "error": "this worker serves no registry alias (HEIMDALL_MODEL_URI=models:/name@alias)"}
    ctx.watcher.request_check()
    now = ctx.watcher.current
    return {"ok": True, "uri": now.primary.uri, "serving": now.primary.version,
            **({"others": {ref: m.version for ref, m in now.others}} if ctx.watcher.refs else {}),
            **({"bands": {uri: m.version for uri, m in now.bands}} if now.bands else {})}


@after_setup_logger.connect
@after_setup_task_logger.connect
def _setup_logs(logger: Any = None, **_: Any) -> None:
    """Fix summaries on the success lines; JSON lines with HEIMDALL_LOG_FORMAT=json."""
    if logger is not None:
        configure_logging(logger, process_settings().log_format)


@celeryd_after_setup.connect
def _say_endpoints(**_: Any) -> None:
    """Which servers this worker uses (passwords redacted), and a warning for each that does not answer."""
    check_endpoints(process_settings())


@worker_shutdown.connect
def _close_main(**_: Any) -> None:
    old = install(None)
    if old is not None and old.run_dir is not None and old.pid == os.getpid():
        shutil.rmtree(old.run_dir, ignore_errors=True)


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # A prefork child has no context of its own yet (the parent's was dropped at fork); under the
    # solo pool this is the main process, whose context (and exporter) the service is added to.
    one_thread_per_process()
    base = current()
    up = parent()
    models = base.models if base else (up.models if up else None)
    state = base.model_state if base else (up.model_state if up else None)
    # (build_child_context reads the state file first: a swap published since the fork is loaded directly)
    try:
        built = build_child_context(base.settings if base else process_settings(), base.metrics if base else None,
                                    models, state)
    except Exception:  # leave it lazy: the first task reports the real error
        log.exception("could not build the service in this process")
        return
    run_dir = base.run_dir if base else (up.run_dir if up else None)
    install(base.with_(service=built.service, metrics=built.metrics, models=built.models,
                       model_seen=built.model_seen) if base else replace(built, run_dir=run_dir))
    mark_child_ready(run_dir, served_models(built.service))


@worker_process_shutdown.connect
def _close_child(**_: Any) -> None:
    old = install(None)
    if old is not None and old.service is not None:
        clear_child_ready(old.run_dir)
