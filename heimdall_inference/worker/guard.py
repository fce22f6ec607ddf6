"""The message guard: a task message's shape is bounded before anything recursive touches it.

Celery decodes a task message in the worker's main process and then pickles its arguments to a
pool child. A message of lists nested a few hundred deep is 2 KB of JSON, but pickling it raises
RecursionError in the main process, which Celery treats as unrecoverable: the worker dies, restarts,
takes the same message again and dies again until the delivery limit dead-letters it together with
every message prefetched beside it. A body that does not decode at all is acked and dropped by
Celery with one log line: no result, no dead letter.

So every ``heimdall.*`` task that carries payloads runs :func:`refusal` on its message first, in the
main process, without recursion: the body's size against the cap, then the decoded body's nesting
depth and element count, walked with an explicit stack. A refused message gets a FAILURE result
with a typed :class:`~heimdall_inference.errors.PayloadError` (the producer's ``get()`` raises it at
once) and is rejected without requeue, so it ends in ``heimdall.dead`` alone; its neighbours are not
touched. The wiring into Celery's strategy is :func:`.celery_internals.guarded`.
"""

from __future__ import annotations

from typing import Any

from kombu.exceptions import DecodeError

from ..errors import PayloadCode, PayloadError

__all__ = ["MAX_DEPTH", "MAX_ITEMS", "ENVELOPE_BYTES", "MAX_TASK_ID_CHARS", "shape_problem", "refusal",
           "usable_task_id", "message_refusal", "guard"]

MAX_DEPTH = 16
"""Deepest nesting of lists/dicts in a task body. A predict body is 6 deep (body, args, payload,
receivers, receiver, iq), a chunk 7; anything near the interpreter's recursion limit is refused."""

MAX_ITEMS = 250_000
"""Most lists, dicts and scalars in one body: a batch of 1,000 seven-receiver payloads has ~80,000."""

ENVELOPE_BYTES = 64 * 1024
"""What a single-payload message may carry beyond the payload cap (Celery's envelope, base64 padding)."""

MAX_TASK_ID_CHARS = 255
"""A task id keys a result in Redis and a row in the database: printable, at most this long."""


def usable_task_id(task_id: Any) -> bool:
    """Can this task id key a result and a row? (a printable string of 1-255 characters)"""
    return isinstance(task_id, str) and 0 < len(task_id) <= MAX_TASK_ID_CHARS and task_id.isprintable()


def shape_problem(body: Any, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> str | None:
    """Why a decoded body is too deep or too large to handle, or None. Iterative: never recurses.

    Elements are counted as their container is opened (a dict's keys count too); only containers go
    on the stack, so a body is walked at about 10 us per seven-receiver payload.
    """
    if not isinstance(body, (dict, list, tuple)):
        return None
    stack: list[tuple[Any, int]] = [(body, 1)]
    items = 1
    while stack:
        obj, depth = stack.pop()
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        if isinstance(obj, dict):
            items += 2 * len(obj)
            children: Any = obj.values()
        else:
            items += len(obj)
            children = obj
        if items > max_items:
            return f"more than {max_items} elements"
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list, tuple)))
    return None


def refusal(raw_body: bytes | str | None, decode: Any, *, max_body_bytes: int | None) -> PayloadError | None:
    """The typed error for a message that must not reach a pool child, or None when it may.

    ``decode`` returns the decoded body (kombu's ``message.payload``); kombu's DecodeError means the
    body is not what its content type says (or nests too deep for the decoder itself). A content type
    the worker does not accept (pickle) is left to Celery, which dead-letters it.
    """
    size = len(raw_body) if raw_body is not None else 0
    if max_body_bytes is not None and size > max_body_bytes:
        return PayloadError(PayloadCode.PAYLOAD_TOO_LARGE, f"the task message is {size} bytes; the cap is "
                            f"{max_body_bytes}", size_bytes=size, max_bytes=max_body_bytes)
    try:
        body = decode()
    except (DecodeError, RecursionError) as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        return PayloadError(PayloadCode.DECODE_ERROR, f"the task message does not decode: {type(cause).__name__}: "
                            f"{str(cause)[:160]}", size_bytes=size)
    problem = shape_problem(body)
    if problem is not None:
        return PayloadError(PayloadCode.DECODE_ERROR, f"the task message is {problem}", size_bytes=size)
    return None


def message_refusal(message: Any, *, max_body_bytes: int | None) -> PayloadError | None:
    """:func:`refusal` for a kombu message (its raw body, and its body decoded once by kombu), after its
    task id: one that cannot key a result or a row is refused too (it can only be dead-lettered)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    if "id" in headers and not usable_task_id(headers["id"]):
        return PayloadError(PayloadCode.DECODE_ERROR, f"the task id must be a printable string of 1-"
                            f"{MAX_TASK_ID_CHARS} characters", "id")
    return refusal(message.body, lambda: message.payload, max_body_bytes=max_body_bytes)


def guard(handler: Any, *, app: Any, consumer: Any, max_body_bytes: int | None) -> Any:
    """A strategy's task message handler behind the message guard."""
    from . import celery_internals as internals

    return internals.guarded(handler, app=app, consumer=consumer,
                             refuse=lambda m: message_refusal(m, max_body_bytes=max_body_bytes))
