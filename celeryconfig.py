"""Celery settings for heimdall-inference: Celery loads this module by name (``celeryconfig``).

Thin on purpose: the settings are read once from ``HEIMDALL_*`` (:func:`heimdall_inference.settings.
process_settings`) and turned into Celery's by :func:`heimdall_inference.worker.config.build`, where
each one is explained. ``CELERY_CONFIG_MODULE`` names another module instead.
"""

from heimdall_inference.settings import process_settings
from heimdall_inference.worker.config import build

globals().update(build(process_settings()))
