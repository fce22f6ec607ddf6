"""The worker's per-process set-up and tear-down, as Celery signal handlers.

* ``worker_init`` (main process, before the pool forks): nothing at all on an untested Celery
  (the :class:`~.celery_internals.VersionGuard` bootstep stops the worker right after); else
  pin glibc's mmap threshold (:mod:`~heimdall_inference.ops.memory`: memory stays flat after large
  messages; the children inherit it), declare ``heimdall.dead`` so that dead letters have somewhere to go,
  declare the live and batch queues (one clear error, and the queue consumed as it is, when one exists
  with other arguments such as an older delivery limit); with
  ``HEIMDALL_METRICS_PORT``, prepare prometheus-client's multiprocess folder and start the exporter
  (``/metrics``, ``/healthz``); install the main process' :class:`~.context.ProcessContext`.
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
from typing import Any

from celery.signals import (celeryd_after_setup, worker_init, worker_process_init, worker_process_shutdown,
                            worker_shutdown)

from ..errors import ConfigError
from ..ops.endpoints import check_endpoints
from ..ops.exporter import MetricsExporter
from ..ops.health import worker_health
from ..ops.memory import pin_mmap_threshold
from ..ops.metrics import prepare_multiprocess_dir
from ..settings import process_settings
from .celery_internals import check_versions
from .context import ProcessContext, build_child_context, current, install
from .topology import dead_queue, is_amqp, work_queues

__all__: list[str] = []

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


def _start_exporter(worker: Any, port: int) -> MetricsExporter | None:
    """The multiprocess folder (before the pool forks: children inherit the variable) and the exporter."""
    try:
        own_folder = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        folder = prepare_multiprocess_dir()
        return MetricsExporter(port, health=lambda: worker_health(worker), multiprocess_dir=folder,
                               remove_dir_on_stop=own_folder).start()
    except Exception:  # no metrics is bad; no worker would be worse
        log.exception("could not start the metrics exporter on port %d", port)
        return None


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
    _declare_dead_letter_queue(sender)
    _declare_work_queues(sender, settings)
    exporter = _start_exporter(sender, settings.metrics_port) if settings.metrics_port > 0 else None
    install(ProcessContext(settings=settings, exporter=exporter))


@celeryd_after_setup.connect
def _say_endpoints(**_: Any) -> None:
    """Which servers this worker uses (passwords redacted), and a warning for each that does not answer."""
    check_endpoints(process_settings())


@worker_shutdown.connect
def _close_main(**_: Any) -> None:
    install(None)


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    # A prefork child has no context of its own yet (the parent's was dropped at fork); under the
    # solo pool this is the main process, whose context (and exporter) the service is added to.
    base = current()
    try:
        built = build_child_context(base.settings if base else process_settings(), base.metrics if base else None)
    except Exception:  # leave it lazy: the first task reports the real error
        log.exception("could not build the service in this process")
        return
    install(base.with_(service=built.service, metrics=built.metrics) if base else built)


@worker_process_shutdown.connect
def _close_child(**_: Any) -> None:
    install(None)
