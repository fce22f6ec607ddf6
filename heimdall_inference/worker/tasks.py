"""Celery tasks: thin wrappers over :class:`heimdall_inference.worker.service.Service`.

* ``heimdall.predict(payload)`` -> ``heimdall.fix/v1``; invalid input fails with the typed
  :class:`PayloadError` (``{"code", "message", "field"}``), never retried; an unreachable database
  is retried with exponential backoff.
* ``heimdall.predict_chunk(payloads, offset)`` -> chunk summary (one vectorised pass, one transaction);
  on the batch queue, and a worker runs it only on a child no live request is waiting for.
* ``heimdall.predict_batch(payloads, chunk_size)`` -> replaced by a chord of chunks and a summary.
* ``heimdall.collect(summaries)`` -> ``heimdall.batch/v1`` summary (the chord callback).
* ``heimdall.model_info()`` -> the model's name, version, hash, providers and card.
* ``heimdall.noop()`` -> None: the benchmark's floor.

A soft time limit is a server fault, never the producer's: the request is retried (with backoff, like
an unreachable database), not acked away. Producers send no time limits in their messages
(:class:`HeimdallTask`): the worker's own ``HEIMDALL_TASK_*_TIME_LIMIT_S`` apply.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Task, chord, group
from celery.exceptions import SoftTimeLimitExceeded

from .celery_app import app
from ..errors import PayloadCode, PayloadError, TransientError
from .batching import MISSING, sent_at_s, take_precomputed
from .service import summarize
from .context import current_service
from ..ops.logs import remember_fix

__all__ = ["HeimdallTask", "predict", "predict_chunk", "predict_batch", "collect", "model_info", "noop",
           "batch_signature", "retried_on_time_limit"]

MAX_BATCH_PAYLOADS = 1000  #: heimdall.predict_batch carries its payloads in one message; cap it


def bare(exc: PayloadError) -> PayloadError:
    """A client's typed error without the frames it was raised through: its code, field and message say it all.

    Celery turns a failure into a billiard ``ExceptionInfo``, which copies every frame of the traceback with
    each code object's positions (``co_positions``: thousands for the pipeline's and the tracer's functions),
    formats it into the result and pickles it to the worker's main process. With the decoder's frames a
    rejected payload cost the child ~9 ms and the main process ~3 ms, three times a fix; without them the
    traceback is the tracer's own few frames. Raise it ``from None``: its context is the pipeline's too.
    """
    return exc.with_traceback(None)

class HeimdallTask(Task):
    """Celery's Task, except that a message carries no time limits unless the caller passes them.

    Celery copies the producer's ``task_time_limit`` and ``task_soft_time_limit`` into every message,
    and a worker obeys the message over its own settings: any producer would silently override the
    worker's ``HEIMDALL_TASK_SOFT_TIME_LIMIT_S``. With ``None`` in the message the worker's own apply.
    """

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        options.setdefault("time_limit", None)
        options.setdefault("soft_time_limit", None)
        return super().apply_async(args, kwargs, **options)


@contextmanager
def retried_on_time_limit(what: str) -> Iterator[None]:
    """A soft time limit inside the block becomes a TransientError: the task retries (idempotent writes),
    instead of failing and being acknowledged with its work lost."""
    try:
        yield
    except SoftTimeLimitExceeded as exc:
        raise TransientError(f"{what} reached the soft time limit; retried") from exc


_retry = dict(autoretry_for=(TransientError,), retry_backoff=1, retry_backoff_max=60, retry_jitter=True,
              max_retries=8, throws=(PayloadError,))


#: Celery reprs every return value for its success line before the line is written (153 us for a fix at its default
#: 1024 characters); the line shows a one-line summary instead (ops/logs.py), so the repr is cut short
_SHORT_REPR = {"resultrepr_maxsize": 64}


@app.task(name="heimdall.predict", bind=True, base=HeimdallTask, Strategy="heimdall_inference.worker.batching:strategy",
          **_retry, **_SHORT_REPR)
def predict(self, payload: Any) -> dict[str, Any]:
    done = take_precomputed(self.request.id)  # computed with others by batching.run_batch
    if done is MISSING:
        try:
            with retried_on_time_limit("the request"):
                done = current_service().predict(payload, task_id=self.request.id,
                                                 sent_at_s=sent_at_s(vars(self.request)))
        except PayloadError as exc:
            done = exc
    if isinstance(done, PayloadError):
        raise bare(done) from None
    if isinstance(done, BaseException):
        raise done
    remember_fix(self.request.id, done)  # the success log line says it in one line, not the whole document
    return done


_BULK = "heimdall_inference.worker.batching:bulk_strategy"  #: batch work: guarded, and yields to live requests


@app.task(name="heimdall.predict_chunk", bind=True, base=HeimdallTask, Strategy=_BULK, **_retry)
def predict_chunk(self, payloads: list[Any], offset: int = 0) -> dict[str, Any]:
    if not isinstance(payloads, list):
        raise PayloadError(PayloadCode.INVALID_FIELD, "a chunk is a list of payloads", "payloads")
    with retried_on_time_limit("the chunk"):
        return current_service().predict_chunk(payloads, task_id=self.request.id, offset=int(offset))


@app.task(name="heimdall.collect", base=HeimdallTask, Strategy=_BULK)
def collect(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    return summarize(summaries)


def batch_signature(payloads: list[Any], chunk_size: int = 64, serializer: str = "json"):
    """chord(group(predict_chunk ...), collect): the fixes go to the database, the summary comes back."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    chunks = [predict_chunk.s(payloads[i:i + chunk_size], i).set(
                  serializer=serializer, argsrepr=f"(<{len(payloads[i:i + chunk_size])} payloads>, {i})")
              for i in range(0, len(payloads), chunk_size)]
    return chord(group(chunks), collect.s())


@app.task(name="heimdall.predict_batch", bind=True, base=HeimdallTask, Strategy=_BULK, throws=(PayloadError,))
def predict_batch(self, payloads: list[Any], chunk_size: int = 64) -> Any:
    if not isinstance(payloads, list) or not payloads:
        raise PayloadError(PayloadCode.INVALID_FIELD, "a batch is a non-empty list of payloads", "payloads")
    if len(payloads) > MAX_BATCH_PAYLOADS:
        raise PayloadError(PayloadCode.PAYLOAD_TOO_LARGE, f"{len(payloads)} payloads in one message; send at most "
                           f"{MAX_BATCH_PAYLOADS}, or build the chord client-side (client.predict_batch)", "payloads")
    if not isinstance(chunk_size, int) or not 1 <= chunk_size <= MAX_BATCH_PAYLOADS:
        raise PayloadError(PayloadCode.INVALID_FIELD, "chunk_size must be an integer in 1..1000", "chunk_size")
    raise self.replace(batch_signature(payloads, chunk_size))


@app.task(name="heimdall.noop", base=HeimdallTask)
def noop(_: Any = None) -> None:
    """Does nothing: the benchmark's floor (Celery's own per-task cost on this broker and backend)."""
    return None


@app.task(name="heimdall.model_info", base=HeimdallTask)
def model_info() -> dict[str, Any]:
    return current_service().model_info()
