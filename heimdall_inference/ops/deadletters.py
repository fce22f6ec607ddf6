"""Dead letters an operator can work: what is in ``heimdall.dead``, why it died, and putting it back.

``heimdall.dead`` holds the messages RabbitMQ dead-lettered from the work queue: a message that killed
its worker child until the queue's delivery limit (reason ``delivery_limit``), or one the worker
refused before running it (``rejected``: a message the guard could not handle, or pickle). Each
:class:`DeadLetter` says which task it was, why and when it died, how many times it was delivered,
and the error stored for it in the result backend when there is one.

Browsing never consumes: messages are taken without acknowledgement and the channel is closed, so
the broker puts every one of them back. :func:`replay` publishes a message again, unchanged, to the
exchange and routing key it was first published to (with publisher confirms), and only then removes
it from ``heimdall.dead``. Used by ``heimdall-inference dead list|show|replay|purge``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from kombu import Connection, Producer

from ..worker.topology import dead_queue

__all__ = ["DeadLetter", "list_dead", "show_dead", "replay", "purge"]

_DEATH_HEADERS = ("x-death", "x-first-death-reason", "x-first-death-queue", "x-first-death-exchange",
                  "x-last-death-reason", "x-last-death-queue", "x-last-death-exchange", "x-delivery-count")


@dataclass
class DeadLetter:
    """One message in ``heimdall.dead``."""

    task_id: str | None
    task: str | None
    reason: str | None  #: delivery_limit (it killed its worker too often), rejected (refused), expired, maxlen
    queue: str | None  #: where it died
    exchange: str | None  #: where it was first published, and with which routing key (where replay sends it)
    routing_key: str | None
    deaths: int  #: times dead-lettered
    delivered: int | None  #: deliveries before it died (quorum queues count them)
    died_at: str | None  #: ISO 8601, UTC
    size_bytes: int
    content_type: str | None
    error: dict[str, Any] | None = field(default=None)  #: the FAILURE stored for the task, when there is one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _death(headers: dict[str, Any]) -> dict[str, Any]:
    deaths = headers.get("x-death") or []
    return deaths[0] if deaths and isinstance(deaths[0], dict) else {}


def _letter(message: Any) -> DeadLetter:
    headers = message.headers or {}
    death = _death(headers)
    keys = death.get("routing-keys") or []
    when = death.get("time")
    if isinstance(when, dt.datetime):
        when = when.replace(tzinfo=when.tzinfo or dt.timezone.utc).isoformat()
    delivered = headers.get("x-delivery-count")
    return DeadLetter(
        task_id=headers.get("id"), task=headers.get("task"),
        reason=headers.get("x-first-death-reason") or death.get("reason"),
        queue=headers.get("x-first-death-queue") or death.get("queue"),
        exchange=headers.get("x-first-death-exchange") or death.get("exchange"),
        routing_key=keys[0] if keys else None, deaths=int(death.get("count") or 1),
        delivered=int(delivered) if isinstance(delivered, int) else None, died_at=str(when) if when else None,
        size_bytes=len(message.body or b""), content_type=message.content_type)


@contextmanager
def _browse(conn: Connection, limit: int) -> Iterator[list[Any]]:
    """Up to ``limit`` messages of heimdall.dead, unacknowledged: whatever the block does not acknowledge
    goes back to the queue when the block's channel closes."""
    channel = conn.channel()
    try:
        queue = dead_queue()(channel)
        queue.declare()
        out = []
        while len(out) < limit:
            m = queue.get(no_ack=False)
            if m is None:
                break
            out.append(m)
        yield out
    finally:
        channel.close()  # the broker requeues every message not acknowledged


def _with_errors(app: Any, letters: list[DeadLetter]) -> list[DeadLetter]:
    """Add the FAILURE the worker stored for each task (the guard's refusal), where the backend has one."""
    backend = app.backend
    for d in letters:
        if not d.task_id:
            continue
        try:
            meta = backend.get_task_meta(d.task_id)
        except Exception:  # the result backend is optional here: the letter stands without its error
            continue
        if meta.get("status") == "FAILURE":
            exc = meta.get("result")
            d.error = {"type": type(exc).__name__, "detail": list(getattr(exc, "args", ()))[:3]}
    return letters


def list_dead(app: Any, *, limit: int = 100) -> list[DeadLetter]:
    """The first ``limit`` dead letters (left in the queue)."""
    with app.connection_for_write() as conn, _browse(conn, limit) as messages:
        letters = [_letter(m) for m in messages]
    return _with_errors(app, letters)


def show_dead(app: Any, task_id: str, *, limit: int = 10_000) -> tuple[DeadLetter, dict[str, Any]] | None:
    """One dead letter and its message headers (left in the queue), or None."""
    with app.connection_for_write() as conn, _browse(conn, limit) as messages:
        for m in messages:
            if (m.headers or {}).get("id") == task_id:
                letter = _letter(m)
                headers = {k: v for k, v in (m.headers or {}).items() if k not in ("x-death",)}
                break
        else:
            return None
    return _with_errors(app, [letter])[0], headers


def replay(app: Any, task_ids: Iterable[str] | None = None, *, limit: int = 10_000) -> list[str]:
    """Publish the chosen dead letters again (all of them when ``task_ids`` is None) to where they were
    first published, then remove them from heimdall.dead. Returns the replayed task ids."""
    wanted = None if task_ids is None else set(task_ids)
    done: list[str] = []
    with app.connection_for_write() as conn, _browse(conn, limit) as messages:
        producer = Producer(conn.channel())
        try:
            for m in messages:
                letter = _letter(m)
                if wanted is not None and letter.task_id not in wanted:
                    continue
                if not letter.exchange and not letter.routing_key:
                    continue  # nowhere known to send it: it stays
                headers = {k: v for k, v in (m.headers or {}).items() if k not in _DEATH_HEADERS}
                producer.publish(m.body, exchange=letter.exchange or "", routing_key=letter.routing_key or "",
                                 headers=headers, content_type=m.content_type, content_encoding=m.content_encoding,
                                 correlation_id=m.properties.get("correlation_id"), delivery_mode=2, retry=True)
                m.ack()  # only once the broker confirmed the copy
                done.append(letter.task_id or "")
        finally:
            producer.channel.close()
    return done


def purge(app: Any) -> int:
    """Drop every message in heimdall.dead; returns how many there were."""
    with app.connection_for_write() as conn:
        channel = conn.channel()
        try:
            queue = dead_queue()(channel)
            queue.declare()
            return int(queue.purge() or 0)
        finally:
            channel.close()

