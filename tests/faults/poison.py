"""Celery configuration for the poison test: the worker's own, plus a task that kills its child.

Used as ``CELERY_CONFIG_MODULE=tests.faults.poison`` by tests/faults/test_workers.py only; the
package never loads it.
"""

from celeryconfig import *  # noqa: F401,F403  (the worker's configuration, unchanged)

imports = ("tests.faults.poison_task",)
