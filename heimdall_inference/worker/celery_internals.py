"""Every use of Celery, kombu and billiard internals in heimdall-inference, behind one version check.

The service needs a few things those libraries do not offer as public API:

* **the message guard** (:mod:`.guard`): the task message handler Celery's strategy returns,
  wrapped, and the consumer's reject promise it is called with;
* **micro-batching** (:mod:`.batching`): Celery's default execution strategy with another
  ``on_task_request``; a request's raw tracer arguments (``Request._type``, ``_request_dict``,
  ``_body``, ``_content_type``, ``_content_encoding``); the tracer itself (``fast_trace_task`` /
  ``trace_task_ret``); the prefork pool's ``apply_async`` with its accept/timeout/result callbacks,
  and the worker Request's side of them (``on_accepted``, ``on_timeout``, ``on_success``,
  ``on_failure``, ``execute_using_pool``, ``time_limits``, ``revoked``, ``_apply_result``);
* **batched and guarded result writes** (:mod:`.result_backend`): ``RedisBackend._store_result``,
  ``Backend._get_result_meta``, and what Celery's Redis ResultConsumer raises when it gives up
  reconnecting (a RuntimeError caused by the connection error);
* **a prefetch window of its own for the batch queue** (:class:`BatchQueuePrefetch`): the task
  consumer's ``consume``, wrapped, and the consumer's QoS attributes;
* **atomic publishes on the filesystem transport** (:mod:`.fs_transport`): ``Channel._put``;
* **re-pointing a producer's app** (:func:`reset_producer_state`): ``Celery._pool``,
  ``_backend_cache``, ``_local`` and the cached ``amqp`` property;
* **the prefork pool's pipes** (:class:`PoolPipes`): billiard's ``connection.send_offset`` and
  celery's ``AsynPool.create_process_queues`` with the queues' ``_reader``/``_writer`` connections;
* **cheaper failures** (:func:`compact_tracebacks`): billiard's ``einfo._Code.__init__``.

Nothing else in the package touches an underscore attribute of those libraries. Each of these was
written against, and is tested on, the versions in :data:`TESTED_VERSIONS`; :func:`check_versions`
raises :class:`~heimdall_inference.errors.ConfigError` for any other minor version, and
:class:`VersionGuard` (a worker bootstep, added by :mod:`.celery_app`) runs it when a worker
starts, so an untested Celery stops the worker with one clear line instead of misbehaving under load.
The package pins the same minors (``setup.cfg``); move both together after running the suite.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
import weakref
from array import array
from collections.abc import Callable, Mapping
from time import monotonic
from typing import Any

import billiard
import billiard.connection
import billiard.einfo
import celery
import kombu
from celery import bootsteps
from celery.concurrency import asynpool
from celery.backends.redis import RedisBackend
from celery.backends.redis import ResultConsumer as RedisResultConsumer
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps

from ..errors import ConfigError
from .guard import usable_task_id

__all__ = ["TESTED_VERSIONS", "installed_versions", "check_versions", "VersionGuard", "BatchQueuePrefetch",
           "default_strategy", "is_prefork_pool", "trace_args", "tracer", "apply_to_pool", "ConsumerView",
           "BatchRequests", "is_revoked", "is_reserved", "in_flight", "shutdown_started", "run_alone", "run_alone_then", "guarded",
           "TolerantResultConsumer", "RedisBackendWithWriteHook", "close_result_backend", "is_result_consumer_failure",
           "AtomicFilesystemChannel",
           "reset_producer_state", "PoolPipes", "fast_pool_pipes", "POOL_PIPE_BYTES", "compact_tracebacks",
           "CodePositions"]

log = logging.getLogger(__name__)

TESTED_VERSIONS: Mapping[str, tuple[int, int]] = {"celery": (5, 7), "kombu": (5, 7), "billiard": (4, 3)}
"""Library -> the (major, minor) whose internals this module was written for and tested on."""


def installed_versions() -> dict[str, str]:
    """The versions of celery, kombu and billiard this process imported."""
    return {"celery": celery.__version__, "kombu": kombu.__version__, "billiard": billiard.__version__}


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def check_versions(versions: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError unless every library is at the minor version in :data:`TESTED_VERSIONS`."""
    versions = installed_versions() if versions is None else versions
    wrong = [f"{name} {versions.get(name, 'missing')} (tested: {major}.{minor}.x)"
             for name, (major, minor) in TESTED_VERSIONS.items() if _minor(versions.get(name, "")) != (major, minor)]
    if wrong:
        raise ConfigError("heimdall-inference uses internals of " + ", ".join(wrong) + "; install the tested "
                          "versions (pip install -e .) or update heimdall_inference/worker/celery_internals.py "
                          "and its tests for the new ones")


class VersionGuard(bootsteps.Step):
    """Worker bootstep: refuse to start on an untested celery/kombu/billiard minor version."""

    name = "heimdall version guard"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        check_versions()
        super().__init__(parent, **kwargs)


POOL_PIPE_BYTES = 1 << 20
"""The capacity the prefork pool's pipes are grown to (Linux's default ``fs.pipe-max-size``; 64 KiB otherwise)."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; Python >= 3.10 names it


def _send_offset_view(fd: int, buf: Any, offset: int, write: Callable[[int, Any], int] = os.write) -> int:
    """billiard's ``send_offset`` without the copy: ``buf[offset:]`` of a bytes object copies the rest of it.

    The pool's main process writes each job into a child's pipe as far as the pipe takes it and comes back for
    the rest when the pipe is writable again; billiard slices the remainder into a new bytes object each time,
    so a job of n pipe-fulls copies ~n²/2 of them (a micro-batch of 32 payloads, 2.1 MB through a 64 KiB pipe:
    4.0 ms of the main process' CPU, 1.2 ms through a view; docs/performance.md, "The worker's own cost").
    """
    return write(fd, memoryview(buf)[offset:])


def _grow_pipe(fd: int, size: int) -> int:
    """Grow the pipe behind ``fd`` to ``size`` bytes (or the system's maximum); its capacity after the call."""
    try:
        return fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:  # over fs.pipe-max-size for an unprivileged process, or not a pipe: keep what it has
        try:
            with open("/proc/sys/fs/pipe-max-size", encoding="ascii") as f:
                return fcntl.fcntl(fd, _F_SETPIPE_SZ, min(size, int(f.read())))
        except (OSError, ValueError):
            return -1


_original_create_process_queues = asynpool.AsynPool.create_process_queues


def _create_process_queues_grown(self: Any) -> tuple:
    inq, outq, synq = _original_create_process_queues(self)
    _grow_pipe(inq._writer.fileno(), POOL_PIPE_BYTES)   # jobs: payloads, micro-batches, chord chunks (MBs)
    _grow_pipe(outq._reader.fileno(), POOL_PIPE_BYTES)  # results: a batch's fix documents
    return inq, outq, synq


def fast_pool_pipes() -> None:
    """Make the prefork pool move jobs through its pipes without quadratic copies and in fewer writes.

    Two changes, both process-wide and idempotent: billiard's ``send_offset`` writes from a memoryview, and
    every pool created afterwards (and every child it replaces) gets 1 MiB pipes instead of 64 KiB, so a
    67 KB payload is one write and a 4 MB chord chunk four instead of sixty-four, each a wakeup of the event
    loop in the main process and of the child reading it.
    """
    billiard.connection.send_offset = _send_offset_view
    asynpool.AsynPool.create_process_queues = _create_process_queues_grown


class CodePositions:
    """A code object's ``co_positions()``, listed once per code object and pickled as one bytes object.

    What billiard's picklable traceback keeps of each frame's code so that the traceback module can place
    its carets (Python 3.11): billiard lists the positions of every instruction, for every frame, on every
    failure, then pickles the list to the main process. Celery's tracer function alone has 2,341 of them:
    0.53 ms to list, 0.39 ms to pickle, 0.39 ms to unpickle, for each failed task. Here the same values are
    listed once per code object (cached for as long as the code lives) and pickled as packed integers.
    """

    __slots__ = ("_packed", "__weakref__")
    _NONE = -1  # positions are line and column numbers (>= 0) or None

    def __init__(self, packed: bytes) -> None:
        self._packed = packed

    @classmethod
    def of(cls, code: Any) -> "CodePositions":
        found = _positions.get(code)
        if found is None:
            flat = array("i", (cls._NONE if v is None else v for pos in code.co_positions() for v in pos))
            found = _positions[code] = cls(flat.tobytes())
        return found

    def __iter__(self) -> Any:
        flat = array("i")
        flat.frombytes(self._packed)
        none = self._NONE
        vals = [None if v == none else v for v in flat]
        return iter([tuple(vals[i:i + 4]) for i in range(0, len(vals), 4)])

    def __reduce__(self) -> tuple:
        return CodePositions, (self._packed,)


_positions: "weakref.WeakKeyDictionary[Any, CodePositions]" = weakref.WeakKeyDictionary()


_billiard_code_init = billiard.einfo._Code.__init__  #: billiard's own, as imported (the tests compare against it)


def _code_init(self: Any, code: Any) -> None:
    """billiard 4.3's ``_Code.__init__`` (einfo.py), with the positions from :class:`CodePositions`."""
    self.co_filename = code.co_filename
    self.co_name = code.co_name
    self.co_argcount = code.co_argcount
    self.co_cellvars = ()
    self.co_firstlineno = code.co_firstlineno
    self.co_flags = code.co_flags
    self.co_freevars = ()
    self.co_code = b""
    self.co_lnotab = b""
    self.co_names = code.co_names
    self.co_nlocals = code.co_nlocals
    self.co_stacksize = code.co_stacksize
    self.co_varnames = ()
    self.co_qualname = code.co_qualname
    self._co_positions = CodePositions.of(code)


def compact_tracebacks() -> None:
    """Make each failure's picklable traceback (billiard's ``ExceptionInfo``) cost microseconds, not ~1.3 ms per
    frame of a large function: see :class:`CodePositions`. Process-wide and idempotent; the formatted traceback
    is the same, carets included."""
    billiard.einfo._Code.__init__ = _code_init


class PoolPipes(bootsteps.Step):
    """Worker bootstep: :func:`fast_pool_pipes` before the pool is made (every step is built before any starts),
    and :func:`compact_tracebacks` (inherited by the children the pool forks)."""

    name = "heimdall pool pipes"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        fast_pool_pipes()
        compact_tracebacks()
        super().__init__(parent, **kwargs)


class BatchQueuePrefetch(bootsteps.StartStopStep):
    """Consumer bootstep: the batch queue's consumer gets a prefetch window of its own, a few messages per child.

    Celery sets one prefetch count on the task channel and then consumes every queue on it, so each of
    the two consumers (per-consumer QoS: quorum queues) would reserve ``prefetch_multiplier`` x children
    messages: 64 chord chunks of ~4 MB, read by the worker's main process in one go while the live
    messages it should be dispatching wait. RabbitMQ applies a channel's ``basic.qos`` (not global) to the
    consumers started after it, so the live queues are consumed first with Celery's count, then the
    batch queue with ``HEIMDALL_BATCH_PREFETCH_MULTIPLIER`` x children, and the channel's count is put
    back for any consumer added later. Only on RabbitMQ with per-consumer QoS; elsewhere Celery's as is.

    Reaches in: wraps the task consumer's ``consume`` (kombu ``Consumer``) on this instance, and reads the
    consumer's ``qos_global``, ``initial_prefetch_count`` and ``qos``.
    """

    name = "heimdall batch-queue prefetch"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from ..settings import process_settings

        settings = process_settings()
        consumer = c.task_consumer
        if (consumer is None or getattr(c, "qos_global", True) or c.connection.transport.driver_type != "amqp"
                or settings.batch_queue not in {q.name for q in consumer.queues}):
            return
        children = int(getattr(c.controller, "concurrency", 1) or 1)
        window = max(1, settings.batch_prefetch_multiplier * children)
        batch = c.app.amqp.queues[settings.batch_queue]
        consumer.cancel_by_queue(settings.batch_queue)  # not consumed yet: only taken off the list
        plain_consume = consumer.consume

        def consume(no_ack: Any = None) -> None:
            plain_consume(no_ack)  # the live queues, with Celery's prefetch count
            if consumer.consuming_from(batch.name):
                return
            channel = consumer.channel
            channel.basic_qos(0, window, False)
            try:
                consumer.add_queue(batch)
                plain_consume(no_ack)
            finally:
                channel.basic_qos(0, c.qos.value if c.qos is not None else c.initial_prefetch_count, False)

        consumer.consume = consume
        log.info("%s: %d messages reserved at most (live queues: %d)", batch.name, window, c.initial_prefetch_count)


# -- micro-batching (worker main process) ---------------------------------------------------------------

def default_strategy(task: Any, app: Any, consumer: Any, **kwargs: Any) -> Callable:
    """Celery's own execution strategy (``celery.worker.strategy.default``)."""
    from celery.worker.strategy import default

    return default(task, app, consumer, **kwargs)


def guarded(handler: Callable[..., Any], *, app: Any, consumer: Any,
            refuse: Callable[[Any], BaseException | None]) -> Callable[..., Any]:
    """Celery's task message handler with ``refuse(message)`` first.

    A refused message never becomes a Request (nothing recursive touches its body): its task gets a
    FAILURE result with the error, and the message is rejected without requeue, which dead-letters
    it on RabbitMQ. Anything else goes to ``handler`` untouched.
    """
    connection_errors = consumer.connection_errors

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kwargs: Any) -> Any:
        error = refuse(message)
        if error is None:
            return handler(message, body, ack, reject, callbacks, **kwargs)
        headers = message.headers if isinstance(message.headers, dict) else {}
        task_id, name = headers.get("id"), headers.get("task")
        log.warning("refused %s[%s] before it reached a child: %s", name, task_id, error)
        if usable_task_id(task_id):
            try:
                app.backend.mark_as_failure(task_id, error)
            except Exception:  # the refusal stands (dead letter) even when the result cannot be stored
                log.exception("could not store the refusal of %s[%s]", name, task_id)
        reject(log, connection_errors, False)
        return None

    return task_message_handler


def is_prefork_pool(pool: Any) -> bool:
    """Is this the consumer's prefork pool (the only one whose children micro-batches go to)?"""
    from celery.concurrency.prefork import TaskPool

    return isinstance(pool, TaskPool)


def trace_args(request: Any) -> tuple:
    """What Celery hands its tracer for one request: (task name, id, request dict, body, content type,
    content encoding), as ``Request.execute_using_pool`` does."""
    return (request._type, request.id, request._request_dict, request._body, request._content_type,
            request._content_encoding)


def tracer(app: Any) -> Callable[..., Any]:
    """The tracer ``Request.execute_using_pool`` would send to the pool for this app."""
    from celery.app.trace import fast_trace_task, trace_task_ret

    return fast_trace_task if app.use_fast_trace_task else trace_task_ret


def apply_to_pool(pool: Any, fn: Callable[..., Any], args: tuple, *, on_accepted: Callable[[int, float], None],
                  on_soft_timeout: Callable[[float], None], on_done: Callable[[Any], None],
                  on_failed: Callable[[Any], None], soft_timeout_s: float | None, timeout_s: float | None) -> Any:
    """Run ``fn(*args)`` in a pool child with the callbacks Celery's own requests get.

    billiard calls the timeout callback with keywords (``soft=``, ``timeout=``); a hard limit is
    followed by ``on_failed`` (the child is killed), so only soft limits are passed on here.
    """
    def timed_out(soft: bool = False, timeout: float | None = None) -> None:
        if soft:
            on_soft_timeout(float(timeout or 0.0))

    return pool.apply_async(fn, args=args, accept_callback=on_accepted, timeout_callback=timed_out,
                            callback=on_done, error_callback=on_failed, soft_timeout=soft_timeout_s,
                            timeout=timeout_s)


def is_revoked(request: Any) -> bool:
    """Has this worker Request been revoked (or expired) meanwhile?"""
    return bool(request.revoked())


def is_reserved(request: Any) -> bool:
    """Is this worker Request still one of the consumer's reserved requests? Celery's ``Consumer.on_close``
    forgets the reserved requests of a lost connection (their delivery tags died with its channel)."""
    from celery.worker.state import reserved_requests

    return request in reserved_requests


def in_flight() -> int:
    """Task messages this worker holds now: reserved by the consumer (prefetched, waiting in the micro-batcher or
    running, until acknowledged)."""
    from celery.worker.state import reserved_requests

    return len(reserved_requests)


def shutdown_started() -> bool:
    """Has a warm or cold shutdown of this worker begun? Read as ``celery.worker.state.maybe_shutdown`` does
    (``should_stop`` 0 is a set flag: a warm exit code)."""
    from celery.worker import state

    return any(flag is not None and flag is not False for flag in (state.should_stop, state.should_terminate))


def run_alone(request: Any, pool: Any) -> None:
    """Send one worker Request to the pool exactly as Celery would have."""
    request.execute_using_pool(pool)


def run_alone_then(request: Any, pool: Any, app: Any, on_finished: Callable[[], None],
                   on_accepted: Callable[[], None] = lambda: None) -> Any:
    """:func:`run_alone`, then ``on_finished()`` once the pool reports the request done or failed.

    What ``Request.execute_using_pool`` does (the same tracer, arguments, time limits and callbacks), with
    its result and error callbacks followed by ``on_finished`` (and its accept callback preceded by
    ``on_accepted``): Celery's per-task Request class binds the
    pool's ``apply_async`` when the strategy is made, so a wrapped pool passed to it would not be used.
    """
    from weakref import ref

    hard, soft = request.time_limits
    task = request.task

    def done(result: Any) -> None:
        try:
            request.on_success(result)
        finally:
            on_finished()

    def failed(exc_info: Any) -> None:
        try:
            request.on_failure(exc_info)
        finally:
            on_finished()

    def accepted(pid: int, time_accepted: float) -> None:
        on_accepted()
        request.on_accepted(pid, time_accepted)

    result = pool.apply_async(tracer(app), args=trace_args(request), accept_callback=accepted,
                              timeout_callback=request.on_timeout, callback=done, error_callback=failed,
                              soft_timeout=soft or task.soft_time_limit, timeout=hard or task.time_limit,
                              correlation_id=request.id)
    if result is not None:
        request._apply_result = ref(result)  # what a revoke with terminate=True looks up
    return result


class BatchRequests:
    """The worker Requests of one micro-batch, and what Celery's pool callbacks do for each of them."""

    def __init__(self, requests: list[Any]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def time_limits(self) -> tuple[float | None, float | None]:
        """(soft, hard) seconds, as ``Request.execute_using_pool`` computes them (the first request's)."""
        first = self.requests[0]
        hard, soft = first.time_limits
        return soft or first.task.soft_time_limit, hard or first.task.time_limit

    def trace_args(self) -> list[tuple]:
        return [trace_args(r) for r in self.requests]

    def accepted(self, pid: int, time_accepted: float) -> None:
        for r in self.requests:
            r.on_accepted(pid, time_accepted)

    def soft_timed_out(self, timeout_s: float) -> None:
        for r in self.requests:
            r.on_timeout(True, timeout_s)

    def succeeded(self, results: list[Any]) -> None:
        """Each request's tracer result, handed to it as the pool would (ack, result, events)."""
        for r, res in zip(self.requests, results):
            r.on_success(res)

    def failed(self, exc_info: Any) -> None:
        """A one-request batch failed as a whole (its child died): Celery's own failure handling."""
        (r,) = self.requests
        r.on_failure(exc_info)


class ConsumerView:
    """The consumer as Celery's default strategy sees it, with ``on_task_request`` replaced."""

    def __init__(self, consumer: Any, on_task_request: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


# -- result writes ---------------------------------------------------------------------------------------

class TolerantResultConsumer(RedisResultConsumer):
    """Celery's Redis ResultConsumer, except that dropping a result object never raises.

    ``AsyncResult.__del__`` unsubscribes from the result's channel; with Redis down Celery's consumer
    raises RuntimeError there ("Exception ignored in __del__" for every dropped result). The channel
    died with the connection, and the key has already left ``subscribed_to`` (a reconnect will not
    subscribe to it again), so there is nothing left to undo. Once stopped (a producer re-pointed
    elsewhere), dropping a result opens no new connection either.
    """

    def stop(self) -> None:
        """Close the pub/sub connection for good: a result dropped later must not open a new one."""
        super().stop()
        with self._locked():
            self._pubsub = None

    def cancel_for(self, task_id: str) -> None:
        try:
            super().cancel_for(task_id)
        except RuntimeError as exc:
            if not isinstance(exc.__cause__, self._connection_errors):
                raise
        except self._connection_errors:
            pass


class RedisBackendWithWriteHook(RedisBackend):
    """Celery's RedisBackend with two seams: a subclass may take a result write instead of Redis
    (:meth:`divert_write`), and it sees every write that does go to Redis (:meth:`write_through`).

    :meth:`divert_write` gets the task id, the result document Celery would store (``meta``) and
    the state; returning True means the subclass took it and Celery writes nothing now.
    """

    ResultConsumer = TolerantResultConsumer

    def divert_write(self, task_id: str, meta: dict[str, Any], state: str) -> bool:
        return False

    def wants_writes(self) -> bool:
        """Should this thread's result writes go to :meth:`divert_write` (cheap check first)?"""
        return False

    def write_through(self, write: Callable[[], Any], *, count: int = 1) -> Any:
        """Run ``write()``, which sends ``count`` results to Redis (a subclass may guard it)."""
        return write()

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        if self.wants_writes():
            meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
            meta["task_id"] = bytes_to_str(task_id)
            if self.divert_write(meta["task_id"], meta, state):
                return result
        return self.write_through(lambda: super(RedisBackendWithWriteHook, self)._store_result(
            task_id, result, state, traceback=traceback, request=request, **kwargs))

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """A producer subscribes to the task's result before publishing (Celery's ResultConsumer);
        :meth:`subscribe_failed` decides what a Redis outage there does (Celery: no publish at all)."""
        try:
            super().on_task_call(producer, task_id)
        except RuntimeError as exc:  # the ResultConsumer gave up reconnecting (E_RETRY_LIMIT_EXCEEDED)
            if not isinstance(exc.__cause__, self.connection_errors):
                raise
            self.subscribe_failed(exc)
        except self.connection_errors as exc:
            self.subscribe_failed(exc)
        else:
            self.subscribe_succeeded()

    def subscribe_failed(self, exc: BaseException) -> None:
        raise exc

    def subscribe_succeeded(self) -> None:
        pass


def is_result_consumer_failure(exc: BaseException, backend: Any) -> bool:
    """Did reading a result fail because the Redis result backend does not answer? (Celery raises
    RuntimeError(E_RETRY_LIMIT_EXCEEDED) from the connection error once its ResultConsumer gives up.)"""
    errors = getattr(backend, "connection_errors", ())
    if isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        return isinstance(exc.__cause__, errors)
    return bool(errors) and isinstance(exc, errors)


# -- the embedded transport ---------------------------------------------------------------------------------

class AtomicFilesystemChannel(filesystem.Channel):
    """kombu's filesystem channel whose messages appear only once complete.

    kombu's ``_put`` creates the message file and then writes it while a consumer may already be
    moving it away: the consumer reads an empty file and the worker dies on the JSON error (seen
    under load). Writing to a hidden temporary name in the same folder and renaming it into place
    (``os.replace`` is atomic on POSIX) closes that window.
    """

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        tmp = os.path.join(self.data_folder_out, f".tmp-{uuid.uuid4()}")
        try:
            with open(tmp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(tmp, os.path.join(self.data_folder_out, name))
        except OSError as exc:
            raise filesystem.ChannelError(f"Cannot add {name!r} to {self.data_folder_out!r}") from exc


# -- producers ------------------------------------------------------------------------------------------------

def reset_producer_state(app: Any) -> None:
    """Drop an app's cached producer pool, result backend and router after its configuration changed.

    The broker pool is not closed (kombu's global producer pools may still share its connections); the
    result backend this thread used is closed (its pub/sub and Redis connections), so that no socket is
    left for the garbage collector to find open.
    """
    import threading

    old = app._backend_cache or getattr(app._local, "backend", None)
    app._pool = None
    app._backend_cache = None
    app._local = threading.local()
    app.__dict__.pop("amqp", None)
    if old is not None:
        close_result_backend(old)


def close_result_backend(backend: Any) -> None:
    """Close a dropped Redis result backend's connections (best effort: it is being thrown away)."""
    try:
        consumer = getattr(backend, "result_consumer", None)
        if consumer is not None and hasattr(consumer, "stop"):
            consumer.stop()
        client = backend.__dict__.get("client")  # a cached_property: only if it was ever made
        if client is not None:
            client.connection_pool.disconnect()
    except Exception:  # a backend that cannot close cleanly is dropped all the same
        log.debug("closing a dropped result backend failed", exc_info=True)
