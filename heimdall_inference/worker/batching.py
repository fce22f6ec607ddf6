"""Micro-batching of single ``heimdall.predict`` tasks across the prefork pool.

A fix costs well under a millisecond when computed with others (one feature pass, one ONNX run,
one database transaction) and about twice that alone. Celery hands a prefork child one message at a
time, so batching has to happen before the pool: ``heimdall.predict``'s execution strategy is
Celery's default one (same received/ETA/expiry/revoke/rate-limit handling, same Request objects),
except that a request ready to run goes to a :class:`PoolBatcher` in the worker's main process
instead of straight to the pool.

The batcher is greedy and adds no latency: while a child is free it sends whatever is waiting at
once (a lone request runs alone); while every child is busy, requests gather, and the next child
to finish takes up to ``batch_max`` of them. Batch size therefore follows the load.

In the child, :func:`run_batch` computes the whole batch through
:meth:`Service.predict_requests`, then runs each request through Celery's own tracer, whose task
body only hands over the precomputed outcome. Results, typed failures, autoretry on an unreachable
database, signals and logs are therefore exactly those of a single task, and the main process acks
or rejects each message with Celery's own Request callbacks (``task_acks_late``: a message is
acknowledged after its row is committed).

A batch that fails as a whole (its child was killed, or hit the hard time limit) is not failed as
a whole: each of its requests is run again alone, so that a poison message meets the single-task
treatment (redelivery, then ``heimdall.dead``) and its neighbours are unaffected. A soft time limit
during the batch's pass is a server fault: every request of the pass is retried with backoff (its
writes are idempotent), never acknowledged with its work lost. Messages with an ETA (retries) and
other pools keep Celery's default path.

Requests waiting in the batcher follow Celery's own reserved requests: when the broker connection is
lost Celery forgets its reserved requests (the broker redelivers their messages), and the batcher
drops the waiting ones it no longer reserves; once a shutdown has begun it starts nothing new, and
the waiting messages go back to the broker unacknowledged.

What this needs from Celery's internals (the strategy, the tracer, a request's raw arguments, the
pool's callbacks) comes from :mod:`.celery_internals`, behind its version check.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import deque
from time import monotonic
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from ..errors import TransientError
from . import celery_internals as internals

__all__ = ["PoolBatcher", "scheduler_for", "strategy", "bulk_strategy", "run_batch", "take_precomputed", "sent_at_s", "MISSING", "SENT_AT_HEADER"]

log = logging.getLogger(__name__)

SENT_AT_HEADER = "heimdall_sent_at"
MISSING = object()
_precomputed: dict[str, Any] = {}  #: in a child, during one batch: task id -> fix or exception, for the tracer's task body


def take_precomputed(task_id: str | None) -> Any:
    """The outcome :func:`run_batch` computed for this task (fix or exception), or MISSING."""
    if task_id is None:
        return MISSING
    return _precomputed.pop(task_id, MISSING)


def sent_at_s(request: dict[str, Any]) -> float | None:
    """When the producer sent the task (its ``heimdall_sent_at`` header), from a request dict."""
    v = request.get(SENT_AT_HEADER) or (request.get("headers") or {}).get(SENT_AT_HEADER)
    try:
        return float(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _retry_error(exc: BaseException) -> TransientError:
    err = TransientError("the micro-batch reached the soft time limit; retried")
    err.__cause__ = exc
    return err


def run_batch(items: list[tuple]) -> list[Any]:
    """In a pool child: compute a batch of predict requests, then trace each one like Celery would.

    ``items`` are the arguments Celery gives its tracer for one request (task name, id, request
    dict, body, content type and encoding). Returns the tracer's ``(failed, retval, runtime)`` for
    each, which the main process hands to that request's ``on_success``.
    """
    from kombu.serialization import loads, prepare_accept_content

    from .celery_app import app
    from .context import current_service
    from .result_backend import deferred_writes
    from .service import Request

    accept = prepare_accept_content(app.conf.accept_content)
    requests: list[Request] = []
    batched: list[str] = []
    traced: list[tuple] = []  #: the tracer's arguments, with the bodies decoded here (not twice)
    for item in items:
        name, task_id, request_dict, body, ctype, cenc = item
        traced.append(item)
        try:
            decoded = loads(body, ctype, cenc, accept=accept) if ctype else body
            args, kwargs, _ = decoded
        except Exception:  # the tracer reports it for this request alone
            continue
        traced[-1] = (name, task_id, request_dict, decoded, None, None)
        if len(args) == 1 and not kwargs:
            payload = args[0]
        elif not args and set(kwargs) == {"payload"}:
            payload = kwargs["payload"]
        else:
            continue  # a wrong signature: the tracer reports it
        requests.append(Request(payload, task_id, sent_at_s(request_dict)))
        batched.append(task_id)
    if requests:
        try:
            outcomes: list[Any] = list(current_service().predict_requests(requests))
        except SoftTimeLimitExceeded as exc:  # the pass, not a request, ran out of time: each one retries
            log.warning("a micro-batch of %d reached the soft time limit; each request is retried", len(requests))
            outcomes = [_retry_error(exc) for _ in requests]
        except Exception as exc:  # a store or model failure: every request gets it (TransientError retries)
            outcomes = [exc] * len(requests)
        _precomputed.update(zip(batched, outcomes))
    trace = internals.tracer(app)
    try:
        with deferred_writes(app.backend):  # the batch's results in one Redis round trip, before any ack
            return [trace(*item) for item in traced]
    finally:
        for task_id in batched:
            _precomputed.pop(task_id, None)


class PoolBatcher:
    """The worker main process' scheduler for the prefork pool: live micro-batches first, batch work fairly.

    Live ``heimdall.predict`` requests (:meth:`submit`) gather while every child is busy and go in
    batches of up to ``batch_max`` (``batch_max`` 1: each alone, exactly as Celery would run it). Batch
    work (:meth:`submit_bulk`: chord chunks) runs one request per child and only on a child no live
    request is waiting for; while live requests have arrived within ``live_window_s``, at most
    ``slots - reserved_for_live`` children (never fewer than one) run batch work, so a live fix finds a
    free child instead of waiting behind a chunk. Nothing this scheduler sends is handed to billiard
    before a child is free for it: a request billiard holds can no longer be overtaken. Batch work is
    never starved: when no chunk runs and the oldest has waited ``bulk_max_wait_s``, it takes the next
    free child even while live requests wait (a reserved message must not sit unacknowledged until the
    broker's consumer timeout).

    One scheduler lives as long as its pool; when the broker connection is lost, Celery drops the pool's
    jobs no child had accepted yet (their messages are redelivered) without calling back, and
    :meth:`forget_unaccepted` (called when the consumer starts again) takes them off the count.
    """

    def __init__(self, pool: Any, batch_max: int, slots: int | None = None, *, reserved_for_live: int = 0,
                 live_window_s: float = 2.0, bulk_max_wait_s: float = 5.0, app: Any = None,
                 clock: Any = monotonic) -> None:
        self.pool = pool
        self.batch_max = max(1, int(batch_max))
        self.slots = max(1, int(slots if slots is not None else getattr(pool, "num_processes", 1) or 1))
        self.reserved_for_live = max(0, int(reserved_for_live))
        self.live_window_s = float(live_window_s)
        if app is None:
            from .celery_app import app
        self.app = app
        self.clock = clock
        self.waiting: deque = deque()  #: live requests
        self.bulk: deque = deque()  #: batch-work requests
        self.in_flight = 0  #: jobs of this scheduler in the pool (live batches and bulk requests)
        self.bulk_in_flight = 0
        self.last_live_s = -math.inf
        self.bulk_max_wait_s = float(bulk_max_wait_s)
        self.sizes: deque[int] = deque(maxlen=1000)  #: recent live batch sizes (metrics, tests)
        self._jobs: dict[int, list[bool]] = {}  #: job token -> [bulk, accepted by a child]
        self._tokens = iter(range(1, 1 << 62))

    def submit(self, req: Any) -> None:
        """The consumer's ``on_task_request`` for live predict tasks: queue, then send what can go."""
        if internals.is_revoked(req):
            return
        self.last_live_s = self.clock()
        self.waiting.append(req)
        self.pump()

    def submit_bulk(self, req: Any) -> None:
        """The consumer's ``on_task_request`` for batch work (chord chunks)."""
        if internals.is_revoked(req):
            return
        self.bulk.append((self.clock(), req))
        self.pump()

    def forget_unaccepted(self) -> int:
        """After a lost connection: jobs no child had accepted were dropped by the pool (no callback will come);
        take them off the count. Returns how many."""
        gone = [token for token, (_, accepted) in self._jobs.items() if not accepted]
        for token in gone:
            bulk, _ = self._jobs.pop(token)
            self.in_flight -= 1
            self.bulk_in_flight -= bulk
        if gone:
            log.info("pool scheduler: %d jobs the pool dropped with the lost connection are off the count", len(gone))
        return len(gone)

    def bulk_slots(self) -> int:
        """How many children batch work may hold now."""
        if self.clock() - self.last_live_s <= self.live_window_s:
            return max(1, self.slots - self.reserved_for_live)
        return self.slots

    def pump(self) -> None:
        """Send waiting requests while a child is free, live first; never once a shutdown has begun."""
        if internals.shutdown_started():
            return  # the waiting messages stay unacknowledged: the broker gives them to the next worker
        while self.in_flight < self.slots:
            starved = (self.bulk and self.bulk_in_flight == 0
                       and self.clock() - self.bulk[0][0] >= self.bulk_max_wait_s)
            if self.waiting and not starved:
                batch = [self.waiting.popleft() for _ in range(min(self.batch_max, len(self.waiting)))]
                # a request Celery no longer reserves was dropped with its connection (the broker redelivers it)
                batch = [r for r in batch if _sendable(r)]
                if len(batch) == 1 and self.batch_max == 1:
                    self._send_alone(batch[0], bulk=False)
                elif batch:
                    self._send(internals.BatchRequests(batch))
            elif self.bulk and self.bulk_in_flight < self.bulk_slots():
                _, req = self.bulk.popleft()
                if _sendable(req):
                    self._send_alone(req, bulk=True)
            else:
                return

    def _job(self, bulk: bool) -> int:
        token = next(self._tokens)
        self._jobs[token] = [bulk, False]
        self.in_flight += 1
        self.bulk_in_flight += bulk
        return token

    def _accepted(self, token: int) -> None:
        job = self._jobs.get(token)
        if job is not None:
            job[1] = True

    def _send_alone(self, req: Any, *, bulk: bool) -> None:
        token = self._job(bulk)
        if not bulk:
            self.sizes.append(1)
        try:
            internals.run_alone_then(req, self.pool, self.app, lambda: self._finished(token),
                                     on_accepted=lambda: self._accepted(token))
        except BaseException:
            self._finished(token, pump=False)
            raise

    def _send(self, batch: internals.BatchRequests) -> None:
        token = self._job(False)
        self.sizes.append(len(batch))

        def accepted(pid: int, time_accepted: float) -> None:
            self._accepted(token)
            batch.accepted(pid, time_accepted)

        def done(results: list[Any]) -> None:
            try:
                batch.succeeded(results)
            finally:
                self._finished(token)

        def failed(exc_info: Any) -> None:
            try:
                if len(batch) == 1:
                    batch.failed(exc_info)
                else:
                    log.warning("a batch of %d predict tasks failed as a whole (%r); running each alone",
                                len(batch), getattr(exc_info, "exception", exc_info))
                    for r in batch.requests:  # counted like any job of this scheduler
                        if not internals.is_revoked(r):
                            self._send_alone(r, bulk=False)
            finally:
                self._finished(token)

        soft_s, hard_s = batch.time_limits()
        try:
            internals.apply_to_pool(self.pool, run_batch, (batch.trace_args(),), on_accepted=accepted,
                                    on_soft_timeout=batch.soft_timed_out, on_done=done, on_failed=failed,
                                    soft_timeout_s=soft_s, timeout_s=hard_s)
        except BaseException:
            self._finished(token, pump=False)
            raise

    def _finished(self, token: int, *, pump: bool = True) -> None:
        job = self._jobs.pop(token, None)
        if job is not None:  # a job forgotten after a lost connection is off the count already
            self.in_flight -= 1
            self.bulk_in_flight -= job[0]
        if pump:
            self.pump()


def _sendable(req: Any) -> bool:
    return internals.is_reserved(req) and not internals.is_revoked(req)


_schedulers: "weakref.WeakKeyDictionary[Any, PoolBatcher]" = weakref.WeakKeyDictionary()
"""One scheduler per prefork pool (the worker main process has one pool): the live and the batch
strategies share it, and it outlives the consumer's restarts after a lost connection, so its count
of busy children stays true while their jobs finish."""


def scheduler_for(pool: Any, settings: Any, app: Any) -> PoolBatcher:
    """The pool's scheduler, made on first use from ``settings``."""
    sched = _schedulers.get(pool)
    if sched is not None:
        sched.forget_unaccepted()  # the consumer starts (again): jobs the pool dropped with a lost connection
    if sched is None:
        sched = PoolBatcher(pool, settings.batch_max, reserved_for_live=settings.live_reserved_children,
                            live_window_s=settings.live_window_s, app=app)
        _schedulers[pool] = sched
        log.info("pool scheduler: live micro-batches of up to %d over %d children; batch work on at most %d "
                 "of them while live requests arrive", sched.batch_max, sched.slots,
                 max(1, sched.slots - sched.reserved_for_live))
    return sched


def _body_cap(settings: Any) -> int:
    from .guard import ENVELOPE_BYTES

    return settings.max_payload_bytes * 4 // 3 + ENVELOPE_BYTES  # base64 of the largest IQ, plus the envelope


def strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """``heimdall.predict``'s execution strategy: Celery's default behind the message guard, through the
    pool scheduler on the prefork pool."""
    from ..settings import process_settings
    from .guard import guard

    settings = process_settings()
    view = consumer
    if internals.is_prefork_pool(consumer.pool):
        view = internals.ConsumerView(consumer, scheduler_for(consumer.pool, settings, app).submit)
    return guard(internals.default_strategy(task, app, view, **kwargs), app=app, consumer=consumer,
                 max_body_bytes=_body_cap(settings))


def bulk_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """The strategy of batch work (``heimdall.predict_chunk``): Celery's default behind the message guard
    (no size cap: a chunk carries many payloads), through the pool scheduler on the prefork pool, where it
    yields to live requests."""
    from ..settings import process_settings
    from .guard import guard

    view = consumer
    if internals.is_prefork_pool(consumer.pool):
        view = internals.ConsumerView(consumer, scheduler_for(consumer.pool, process_settings(), app).submit_bulk)
    return guard(internals.default_strategy(task, app, view, **kwargs), app=app, consumer=consumer,
                 max_body_bytes=None)
