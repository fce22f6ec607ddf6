"""Celery's Redis result backend, with the writes of a micro-batch sent in one round trip.

Celery stores each task's result with two Redis round trips (a GET, so that a late duplicate never
overwrites a SUCCESS, then SET + PUBLISH). For a micro-batch of predict tasks (:mod:`.batching`)
that is 2 x N round trips for work that took one feature pass and one transaction. Inside
:meth:`DeferredRedisBackend.deferred_writes` result writes are collected instead and sent when the
block ends: one MGET for the same SUCCESS guard, one pipeline of SET + PUBLISH. The block ends before
the main process acknowledges any of the batch's messages, so a failed flush fails the batch, whose
requests are then run again one by one: nothing is lost. Outside the block it is exactly Celery's
backend (the producer side, single tasks, chords).

The seam into Celery's write path is :class:`.celery_internals.RedisBackendWithWriteHook`.
Selected by :func:`heimdall_inference.worker.config.build` as
``heimdall_inference.worker.result_backend:DeferredRedisBackend+redis://...``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import states

from .celery_internals import RedisBackendWithWriteHook

__all__ = ["DeferredRedisBackend", "deferred_writes"]


class DeferredRedisBackend(RedisBackendWithWriteHook):
    """RedisBackend whose result writes can be deferred to one pipelined flush per block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = threading.local()

    @contextmanager
    def deferred_writes(self) -> Iterator[None]:
        """Collect result writes made in this block (this thread) and flush them on exit."""
        if getattr(self._pending, "writes", None) is not None:  # nested: the outer block flushes
            yield
            return
        self._pending.writes = []
        try:
            yield
        finally:
            writes, self._pending.writes = self._pending.writes, None
        if writes:
            self.ensure(self._flush, (writes,))

    def wants_writes(self) -> bool:
        return getattr(self._pending, "writes", None) is not None

    def divert_write(self, task_id: str, meta: dict[str, Any], state: str) -> bool:
        writes = getattr(self._pending, "writes", None)
        if writes is None:
            return False
        writes.append((self.get_key_for_task(task_id), self.encode(meta), state))
        return True

    def _flush(self, writes: list[tuple[Any, Any, str]]) -> None:
        last: dict[Any, tuple[Any, str]] = {}
        for key, value, state in writes:  # a task written twice in one block keeps its last state
            last[key] = (value, state)
        keys = list(last)
        current = self.client.mget(keys)
        with self.client.pipeline() as pipe:
            for key, raw in zip(keys, current):
                if raw is not None and self.decode_result(raw).get("status") == states.SUCCESS:
                    continue  # the same guard as Celery's: never overwrite a success
                value, state = last[key]
                expires = self.failure_expires if state == states.FAILURE else self.expires
                pipe.set(key, value, ex=expires or None)
                pipe.publish(key, value)
            pipe.execute()


@contextmanager
def deferred_writes(backend: Any) -> Iterator[None]:
    """``backend.deferred_writes()`` where the backend has it, else a block that changes nothing."""
    block = getattr(backend, "deferred_writes", None)
    if block is None:
        yield
        return
    with block():
        yield
