"""The worker's per-process set-up and tear-down, as Celery signal handlers.

* ``worker_init`` (main process, before the pool forks): declare ``heimdall.dead`` so that dead
  letters have somewhere to go; with ``HEIMDALL_METRICS_PORT``, prepare prometheus-client's
  multiprocess folder and start the exporter (``/metrics``, ``/healthz``); install the main
  process' :class:`~.context.ProcessContext`.
* ``worker_process_init`` (each child, after fork): install the child's context: the warm service
  (the ONNX session is created here, never in the parent: sessions inherited across fork can
  crash) and its metrics. Celery kills a child whose handler takes more than a few seconds, so this
  only loads the model (~0.1 s), opens the database pool without waiting and connects the cache
  lazily.
* ``worker_process_shutdown`` / ``worker_shutdown``: close the context (database pool, cache
  client, exporter).

Settings are :func:`~heimdall_inference.settings.process_settings`: read once in the main process,
inherited by the children.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown

from ..ops.exporter import MetricsExporter
from ..ops.health import worker_health
from ..ops.metrics import prepare_multiprocess_dir
from ..settings import process_settings
from .context import ProcessContext, build_child_context, install
from .topology import dead_queue, is_amqp

__all__: list[str] = []

log = logging.getLogger(__name__)


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
def _init_main(sender: Any = None, **_: Any) -> None:
    """The main process' context; with HEIMDALL_METRICS_PORT, the multiprocess folder and the exporter."""
    if sender is None:
        return
    settings = process_settings()
    exporter = None
    if settings.metrics_port > 0:
        try:
            own_folder = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
            folder = prepare_multiprocess_dir()  # before the pool forks: children inherit the variable
            exporter = MetricsExporter(settings.metrics_port, health=lambda: worker_health(sender),
                                       multiprocess_dir=folder, remove_dir_on_stop=own_folder).start()
        except Exception:  # no metrics is bad; no worker would be worse
            log.exception("could not start the metrics exporter on port %d", settings.metrics_port)
    install(ProcessContext(settings=settings, exporter=exporter))


@worker_shutdown.connect
def _close_main(**_: Any) -> None:
    install(None)


@worker_process_init.connect
def _init_child(**_: Any) -> None:
    install(None)  # the parent's context, inherited by fork, is dropped without being closed
    try:
        install(build_child_context(process_settings()))
    except Exception:  # leave it lazy: the first task reports the real error
        log.exception("could not build the service in this child")


@worker_process_shutdown.connect
def _close_child(**_: Any) -> None:
    install(None)
