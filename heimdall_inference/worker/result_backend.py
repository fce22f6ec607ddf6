"""Celery's Redis result backend, with the writes of a micro-batch sent in one round trip, and an
outage that costs results, never fixes.

Celery stores each task's result with two Redis round trips (a GET, so that a late duplicate never
overwrites a SUCCESS, then SET + PUBLISH). For a micro-batch of predict tasks (:mod:`.batching`)
that is 2 x N round trips for work that took one feature pass and one transaction. Inside
:meth:`DeferredRedisBackend.deferred_writes` result writes are collected instead and sent when the
block ends: one MGET for the same SUCCESS guard, one pipeline of SET + PUBLISH. The block ends before
the main process acknowledges any of the batch's messages, so a failed flush fails the batch, whose
requests are then run again one by one: nothing is lost. Outside the block it is exactly Celery's
backend (the producer side, single tasks, chords).

Redis is optional on the hot path. A result write that fails (after Celery's one quick retry, see
``result_backend_transport_options`` in :mod:`.config`) is counted
(``heimdall_results_unwritten_total``) and dropped, and a :class:`~heimdall_inference.ops.breaker.Breaker`
(1 s, doubling up to 10 s) skips further writes until Redis answers again: the fix is already in the
database, the message is acknowledged, and the worker keeps storing fixes at full rate instead of
blocking on retries. A producer whose result subscription fails still publishes (Celery would not);
reading the result then raises :class:`~heimdall_inference.errors.ResultUnavailable`
(:func:`heimdall_inference.client.predict`).

A fix's success document (the hot path's only result) is encoded by msgspec (the same JSON document as
Celery's ``json`` serializer, ~10x faster than the standard library's encoder that took ~8 % of a child's time);
any other result keeps Celery's encoding.

The seams into Celery are :class:`.celery_internals.RedisBackendWithWriteHook` and
:func:`.celery_internals.is_result_consumer_failure`.
Selected by :func:`heimdall_inference.worker.config.build` as
``heimdall_inference.worker.result_backend:DeferredRedisBackend+redis://...``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from celery import states

from ..core.fix import SCHEMA_FIX
from ..ops.breaker import FAILED, SKIPPED, Breaker
from .celery_internals import RedisBackendWithWriteHook, is_result_consumer_failure

__all__ = ["DeferredRedisBackend", "deferred_writes", "result_unreadable", "fast_fix_meta"]

log = logging.getLogger(__name__)

_SUCCESS_META_KEYS = frozenset({"status", "result", "traceback", "children", "date_done", "task_id"})
"""Celery's result document for a success without ``result_extended``: nothing but strings, None, [] and the result."""
_json = msgspec.json.Encoder()


def fast_fix_meta(data: Any) -> bool:
    """Is this Celery's success document for a fix (``heimdall.fix/v1``, built by this package from str, int,
    float, bool, None, lists and dicts), which msgspec encodes to the same JSON as kombu's encoder?
    Anything else (a failure, an extended result carrying the payload's bytes, a date object) is kombu's."""
    return (type(data) is dict and data.keys() <= _SUCCESS_META_KEYS and data.get("status") == states.SUCCESS
            and type(data.get("result")) is dict and data["result"].get("schema") == SCHEMA_FIX
            and type(data.get("date_done")) in (str, type(None)) and not data.get("children")
            and data.get("traceback") is None)


class DeferredRedisBackend(RedisBackendWithWriteHook):
    """RedisBackend whose result writes can be deferred to one pipelined flush per block, and are
    skipped (counted) while Redis does not answer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = threading.local()
        # a PING once per interval while Redis is down: no task waits on it, results resume within ~5 s of its return
        self.breaker = Breaker("the result backend (Redis)", base_s=1.0, max_s=5.0, probe=lambda: self.client.ping())
        self.unwritten = 0  #: results dropped because Redis did not answer (this process)

    def encode(self, data: Any) -> Any:
        """Celery's encoding of a result document, a fix's success by msgspec (:func:`fast_fix_meta`)."""
        if self.serializer == "json" and not self.compression and fast_fix_meta(data):
            return _json.encode(data)
        return super().encode(data)

    def write_through(self, write: Callable[[], Any], *, count: int = 1) -> Any:
        """Send results to Redis unless the breaker is open; a failure drops them (counted), never the task."""
        out = self.breaker.call(write, self.connection_errors)
        if out is SKIPPED or out is FAILED:
            self._unwritten(count)
            return None
        return out

    def _unwritten(self, count: int) -> None:
        self.unwritten += count
        from .context import current  # the process' metrics, where this process records any

        ctx = current()
        if ctx is not None and ctx.metrics is not None:
            ctx.metrics.results_unwritten.inc(count)

    def subscribe_failed(self, exc: BaseException) -> None:
        """A producer could not subscribe to its task's result: publish anyway (the fix reaches the
        database); reading the result will raise ResultUnavailable."""
        log.warning("result backend unavailable (%s): publishing anyway; the result cannot be awaited", exc)
        self.breaker.failure(exc)

    def subscribe_succeeded(self) -> None:
        self.breaker.success()

    def on_task_call(self, producer: Any, task_id: str) -> None:
        if self.breaker.allow():  # while open, publish without subscribing: get() subscribes again
            super().on_task_call(producer, task_id)

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
            self.write_through(lambda: self.ensure(self._flush, (writes,)), count=len(writes))

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


def result_unreadable(exc: BaseException, backend: Any) -> bool:
    """Did reading a result fail because the result backend does not answer (not because of the task)?"""
    return is_result_consumer_failure(exc, backend)


@contextmanager
def deferred_writes(backend: Any) -> Iterator[None]:
    """``backend.deferred_writes()`` where the backend has it, else a block that changes nothing."""
    block = getattr(backend, "deferred_writes", None)
    if block is None:
        yield
        return
    with block():
        yield
