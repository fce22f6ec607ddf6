"""The Celery application: ``celery -A heimdall_inference worker`` finds ``app`` here.

Settings come from the ``celeryconfig`` module (``CELERY_CONFIG_MODULE`` overrides the name); the
tasks live in :mod:`heimdall_inference.tasks`, the per-process set-up in :mod:`heimdall_inference.worker`.
"""

from __future__ import annotations

import os

from celery import Celery

__all__ = ["app"]

app = Celery("heimdall_inference", include=["heimdall_inference.tasks", "heimdall_inference.worker"])
app.config_from_object(os.environ.get("CELERY_CONFIG_MODULE", "celeryconfig"))
