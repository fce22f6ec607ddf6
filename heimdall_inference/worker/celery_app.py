"""The Celery application: ``celery -A heimdall_inference.worker worker`` finds ``app`` here.

Settings come from the ``celeryconfig`` module (``CELERY_CONFIG_MODULE`` overrides the name), loaded
on first use; the tasks live in :mod:`.tasks`, the per-process set-up in :mod:`.lifecycle`. Every
worker starts with :class:`.celery_internals.VersionGuard`, which refuses an untested Celery, and
:class:`.lifecycle.ModelGuard`, which refuses to consume without a model to serve.
"""

from __future__ import annotations

import os

from celery import Celery

from ..settings import Settings, set_process_settings
from .celery_internals import BatchQueuePrefetch, PoolPipes, VersionGuard, reset_producer_state
from .lifecycle import ModelGuard

__all__ = ["app", "configure_app"]

app = Celery("heimdall_inference", include=["heimdall_inference.worker.tasks", "heimdall_inference.worker.lifecycle"])
app.config_from_object(os.environ.get("CELERY_CONFIG_MODULE", "celeryconfig"))
app.steps["worker"].add(VersionGuard)
app.steps["worker"].add(ModelGuard)
app.steps["worker"].add(PoolPipes)
app.steps["consumer"].add(BatchQueuePrefetch)


def configure_app(settings: Settings) -> Celery:
    """Point this process' app (the producer side) at ``settings``, dropping cached clients.

    The app caches its producer pool, result backend and queue router; a process that switches
    configuration (the demo, the benchmark, the tests) must drop them or keep talking to the old
    servers. This process' :func:`~heimdall_inference.settings.process_settings` become ``settings``.
    """
    from .config import build

    app.conf.update(build(settings))
    reset_producer_state(app)
    set_process_settings(settings)
    return app
