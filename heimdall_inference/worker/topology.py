"""Broker topology: exchanges and queues, shared by ``celeryconfig`` and the worker's start-up.

Topic exchanges (Celery's native delayed delivery warns on direct ones). On RabbitMQ the work queue
is a quorum queue with a delivery limit (RabbitMQ 3.x has no default; 4.x defaults to 20) and a
dead-letter route to ``heimdall.dead``, which must be declared even though no worker consumes it:
a dead letter with no queue bound to the dead-letter exchange is silently dropped.
"""

from __future__ import annotations

from kombu import Exchange, Queue

from ..settings import Settings

__all__ = ["EXCHANGE", "DEAD_LETTER_EXCHANGE", "DEAD_QUEUE", "work_queue", "dead_queue", "is_amqp"]

EXCHANGE = Exchange("heimdall", type="topic", durable=True)
DEAD_LETTER_EXCHANGE = Exchange("heimdall.dlx", type="topic", durable=True)
DEAD_QUEUE = "heimdall.dead"


def is_amqp(url: str) -> bool:
    return url.startswith(("amqp://", "amqps://", "pyamqp://"))


def work_queue(settings: Settings) -> Queue:
    """The queue workers consume (``heimdall.predict`` unless configured otherwise)."""
    args = {}
    if is_amqp(settings.broker_url):
        args = {"x-queue-type": "quorum", "x-delivery-limit": settings.delivery_limit,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE.name, "x-dead-letter-routing-key": DEAD_QUEUE}
    return Queue(settings.queue, EXCHANGE, routing_key=f"{settings.queue}.#", queue_arguments=args, durable=True)


def dead_queue() -> Queue:
    """Where poison messages end after the delivery limit."""
    return Queue(DEAD_QUEUE, DEAD_LETTER_EXCHANGE, routing_key="#", queue_arguments={"x-queue-type": "quorum"},
                 durable=True)
