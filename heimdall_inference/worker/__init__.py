"""Everything that knows Celery: the app, its tasks, and what a worker process holds and does.

Start a worker with ``celery -A heimdall_inference.worker worker`` (from the repository root, or
anywhere once the package is installed: ``celeryconfig`` is installed beside it).

Runs in the worker's **main process**: :mod:`.celery_app` (the app and its version guard),
:mod:`.config`, :mod:`.topology` (queues and exchanges), :mod:`.batching` (the micro-batcher: the
``heimdall.predict`` strategy), :mod:`.lifecycle` (signals: dead-letter queue, metrics exporter).
Runs in each **pool child**: :mod:`.tasks`, :mod:`.context` (the process context: warm service and
metrics, built after fork), :mod:`.service` (decode, cache, locate, store; plain Python),
:mod:`.result_backend` (one Redis round trip per batch). Used by **producers** too: :mod:`.celery_app`,
:mod:`.tasks` (signatures), :mod:`.config`, :mod:`.fs_transport` (the embedded broker).
:mod:`.process` runs a worker as a subprocess (the demo, the benchmark, the tests).
:mod:`.celery_internals` is the only module that touches Celery, kombu or billiard internals.
"""

from __future__ import annotations

from .celery_app import app

__all__ = ["app"]
