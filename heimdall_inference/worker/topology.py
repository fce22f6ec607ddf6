"""Broker topology: exchanges and queues, shared by ``celeryconfig`` and the worker's start-up.

Topic exchanges (Celery's native delayed delivery warns on direct ones). Two work queues, each bound
as ``<name>.#``: ``heimdall.predict`` for live fixes and ``heimdall.batch`` for batch work (chord
chunks, their callback, ``predict_batch``), so that a 10,000-payload batch never stands in front of a
live fix at the broker; inside a worker the pool scheduler (:mod:`.batching`) gives live requests the
next free child. On RabbitMQ both are quorum queues with a delivery limit (RabbitMQ 3.x has no
default; 4.x defaults to 20) and a dead-letter route to ``heimdall.dead``, which must be declared
even though no worker consumes it: a dead letter with no queue bound to the dead-letter exchange is
silently dropped.
"""

from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from ..settings import Settings

__all__ = ["EXCHANGE", "DEAD_LETTER_EXCHANGE", "DEAD_QUEUE", "BATCH_TASKS", "work_queue", "batch_queue",
           "work_queues", "task_routes", "dead_queue", "is_amqp"]

EXCHANGE = Exchange("heimdall", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("heimdall.dlx", type="topic", durable=True)
DEAD_QUEUE = "heimdall.dead"
BATCH_TASKS = ("heimdall.predict_chunk", "heimdall.collect", "heimdall.predict_batch")
"""Tasks routed to the batch queue; everything else goes to the live work queue."""


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def _queue(name: str, settings: Settings) -> Queue:
    args: dict[str, Any] = {}
    if is_amqp(settings.broker_url):
        args = {"x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, "x-dead-letter-routing-key": DEAD_QUEUE}
    return Queue(name, EXCHANGE, routing_key=f"{name}.#", queue_arguments=args, durable=True)


def work_queue(settings: Settings) -> Queue:
    """The live queue (``heimdall.predict`` unless configured otherwise)."""
    return _queue(settings.queue, settings)


def batch_queue(settings: Settings) -> Queue:
    """The batch queue (``heimdall.batch`` unless configured otherwise)."""
    return _queue(settings.batch_queue, settings)


def work_queues(settings: Settings) -> tuple[Queue, Queue]:
    """Every queue a worker consumes: live first, then batch."""
    return work_queue(settings), batch_queue(settings)


def task_routes(settings: Settings) -> dict[str, dict[str, str]]:
    """Celery's ``task_routes``: the batch tasks to the batch queue (the rest take the default, live)."""
    return {name: {"queue": settings.batch_queue, "routing_key": f"{settings.batch_queue}.task"}
            for name in BATCH_TASKS}


def dead_queue() -> Queue:
    """Where poison messages end after the delivery limit."""
    return Queue(DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#", queue_arguments={"x-queue-type": "quorum"},
                 durable=True)
