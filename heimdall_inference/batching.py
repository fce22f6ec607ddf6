"""Micro-batching of single ``heimdall.predict`` tasks inside one worker process (threads pool).

With ``celery worker -P threads -c N`` up to N tasks run at once in one process. Each hands its
request to the process' :class:`MicroBatcher` and waits; one batching thread takes whatever requests
are waiting (greedy: it never waits for more, so a lone request adds no latency), runs them through
:meth:`Service.predict_requests` (one feature pass, one ONNX run, one database transaction) and
wakes each task with its own fix or error. A task returns only after its row is committed, so with
``task_acks_late`` nothing is acknowledged before it is stored: batching costs no durability.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .service import Request, Service

__all__ = ["MicroBatcher"]

log = logging.getLogger(__name__)


class MicroBatcher:
    """Greedy batches of up to ``max_batch`` concurrent requests, run by one thread."""

    def __init__(self, service: Callable[[], Service], max_batch: int = 32) -> None:
        self._service = service
        self.max_batch = max(1, max_batch)
        self._queue: queue.Queue[tuple[Request, Future]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.sizes: list[int] = []  #: recent batch sizes (bounded), for metrics and tests

    def submit(self, request: Request, timeout_s: float | None = None) -> dict[str, Any]:
        """Queue one request and wait for its fix (its PayloadError or store error is raised here)."""
        self._ensure_thread()
        fut: Future = Future()
        self._queue.put((request, fut))
        return fut.result(timeout=timeout_s)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="heimdall-batcher", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[tuple[Request, Future]]) -> None:
        self.sizes = (self.sizes + [len(batch)])[-1000:]
        try:
            results = self._service().predict_requests([r for r, _ in batch])
        except BaseException as exc:  # a store or model failure fails every task of the batch (they retry)
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results):
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
