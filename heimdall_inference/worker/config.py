"""The Celery configuration of a heimdall-inference worker or producer, built from :class:`Settings`.

``celeryconfig.py`` at the repository root (the module Celery loads) is ``build(process_settings())``;
:func:`heimdall_inference.worker.celery_app.configure_app` applies ``build(other_settings)`` to a
running producer. Each setting below says why it is what it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..settings import Settings
from . import fs_transport  # noqa: F401  (registers heimdallfs://)
from .topology import is_amqp, task_routes, work_queues

__all__ = ["build"]


def build(s: Settings) -> dict[str, Any]:
    """Celery settings (lower-case names) for these heimdall settings."""
    amqp = is_amqp(s.broker_url)
    conf: dict[str, Any] = dict(
        broker_url=s.broker_url,
        result_backend=s.result_backend,
        # JSON and msgpack only: pickle would let whoever can publish run code in the worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        # Acknowledge after the task ran, and requeue when the child dies, so a killed child's task
        # is redelivered instead of lost; the quorum queue's delivery limit ends poison loops.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Fixes take about a millisecond: reserved messages per child hide the broker round trip.
        # They are also what a free child's micro-batch is drawn from (HEIMDALL_BATCH_MAX caps it):
        # 100 closed-loop producers got ~460 fixes/s with 32, ~360 with 8 or 16 (docs/performance.md).
        # Batch messages (chunks of ~4 MB) have a window of their own, HEIMDALL_BATCH_PREFETCH_MULTIPLIER
        # per child (celery_internals.BatchQueuePrefetch).
        worker_prefetch_multiplier=s.prefetch_multiplier,
        # Keep retrying the broker at start-up (compose starts RabbitMQ and the workers together).
        broker_connection_retry_on_startup=True,
        # A producer keeps trying to publish across a broker restart or a cluster node's loss for about
        # 30 s (reconnecting, to the next URL of a list), instead of Celery's ~1 s; then client.submit
        # raises BrokerUnavailable. A publish retried after a lost confirm may arrive twice: same task id,
        # idempotent rows.
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 30, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0},
        # Far below RabbitMQ's consumer_timeout (30 min): a stuck task is killed and redelivered.
        task_soft_time_limit=s.task_soft_time_limit_s,
        task_time_limit=s.task_time_limit_s,
        # Results are read once by the producer: keep them an hour, not forever.
        result_expires=s.result_expires_s,
        # No arguments in the result meta: result_extended would copy every payload (tens of KB of
        # IQ, megabytes per chunk) into Redis next to its fix (measured: 3x slower chunks).
        result_extended=False,
        # No task events or STARTED states by default: three extra broker messages and a backend
        # write per fix. Flower switches events on by broadcast when it connects (enable_events).
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_track_started=False,
        # Shutdown. SIGTERM is a warm shutdown (running tasks finish, reserved ones go back unacknowledged),
        # bounded by the task time limit. A cold shutdown (SIGQUIT, or SIGTERM with REMAP_SIGTERM=SIGQUIT as
        # in the image) first gives running tasks this long (Celery's soft shutdown; an idle worker stops at
        # once), then ends them; their messages are redelivered (acks late), rows are idempotent. Keep
        # it below the orchestrator's grace period (compose stop_grace_period, Kubernetes
        # terminationGracePeriodSeconds).
        worker_soft_shutdown_timeout=s.shutdown_timeout_s,
        # Children are recycled by memory, not by task count: the warm model is worth keeping. The threshold
        # must come before the container's memory limit, or the OOM killer takes a child mid-task instead.
        worker_max_memory_per_child=s.max_memory_per_child_mb * 1024,  # KiB
        worker_hijack_root_logger=False,
        # Two quorum queues on a topic exchange, dead letters to heimdall.dead (topology module): live
        # fixes on the work queue, batch work (chunks, their callback, predict_batch) on its own, so a
        # large batch never stands in front of a live fix; no queue is created by accident.
        task_queues=work_queues(s),
        task_routes=task_routes(s),
        task_default_queue=s.queue,
        task_default_exchange="heimdall",
        task_default_exchange_type="topic",
        task_default_routing_key=f"{s.queue}.task",
        task_create_missing_queues=False,
        # An unreachable database (TransientError) is retried with exponential backoff (capped at
        # 60 s) this many times before the task fails: about half an hour of outage loses nothing.
        task_annotations={name: {"max_retries": s.db_retry_max}
                          for name in ("heimdall.predict", "heimdall.predict_chunk")},
    )
    # Every key below is always set, so that build() also reconfigures an app configured before.
    conf["result_backend_transport_options"] = {}
    conf["broker_transport_options"] = {}
    conf["worker_detect_quorum_queues"] = amqp
    if s.result_backend.startswith(("redis://", "rediss://")):
        # Celery's Redis backend, whose writes for a micro-batch of predict tasks go in one round
        # trip (worker/result_backend.py); anything else it does exactly as Celery's.
        conf["result_backend"] = "heimdall_inference.worker.result_backend:DeferredRedisBackend+" + s.result_backend
        # One key prefix for everything this deployment keeps in Redis (results and the cache). A failed
        # result write is tried once more, then dropped and counted (worker/result_backend.py): Celery's
        # default (20 tries, 1 s apart) held a child, and then the main process, 20 s per result while
        # Redis was down, and fixes stopped reaching the database.
        conf["result_backend_transport_options"] = {
            "global_keyprefix": s.redis_key_prefix,
            "retry_policy": {"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 0.2}}
        # Celery's default socket timeout is 120 s: a Redis that accepts and never answers would hold a
        # child that long per result.
        conf["redis_socket_timeout"] = 2.0
        conf["redis_socket_connect_timeout"] = 1.0
    if s.result_backend.startswith("file://"):  # the embedded default's result folder must exist
        Path(s.result_backend.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    if amqp:
        # Publisher confirms: a publish returns once RabbitMQ has the message (quorum queues need it).
        conf["broker_transport_options"] = {"confirm_publish": True}
        # (worker_detect_quorum_queues above: quorum queues cannot do global QoS, so Celery detects
        # them and uses per-consumer prefetch.)
    elif s.broker_url.startswith(("filesystem://", "heimdallfs://")):
        # The embedded default: kombu's filesystem transport (heimdallfs: with atomic publishes), one
        # folder for the queue.
        d = Path(s.data_dir or ".heimdall") / "broker"
        for sub in ("queue", "processed", "control"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {"data_folder_in": str(d / "queue"), "data_folder_out": str(d / "queue"),
                                            "processed_folder": str(d / "processed"), "store_processed": False,
                                            "control_folder": str(d / "control"), "polling_interval": 0.05}
    return conf
