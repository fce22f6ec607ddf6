"""What a worker's main process measures at scrape time, beside what its children record.

* **the queues** (``celery_queue_length{queue_name}``, ``celery_active_consumer_count{queue_name}``, the
  names celery-exporter uses): messages ready in the live queue, the batch queue and ``heimdall.dead``,
  and their consumers, asked of the broker with a passive declare on a connection of the exporter's own
  (no extra process per worker). The answer is kept a few seconds, so that several scrapers do not each
  ask; a broker that does not answer within ``timeout_s`` gives ``heimdall_broker_up 0`` and no queue
  figures (never stale ones). Every worker exports the same queue figures: aggregate with ``max by
  (queue_name)``.
* **the worker** (``heimdall_worker_children``, ``heimdall_tasks_in_flight``): live pool children, and the
  task messages this worker holds (reserved: prefetched, waiting in the micro-batcher or running).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

__all__ = ["QueueProbe", "BrokerCollector", "WorkerCollector"]

log = logging.getLogger(__name__)


class QueueProbe:
    """Depth and consumers of ``queues``, asked of the broker at most every ``ttl_s`` seconds."""

    def __init__(self, connect: Callable[[], Any], queues: Sequence[str], *, ttl_s: float = 5.0,
                 timeout_s: float = 2.0) -> None:
        self._connect = connect
        self.queues = tuple(queues)
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._at = float("-inf")
        self._last: dict[str, tuple[int, int]] | None = None

    def read(self) -> dict[str, tuple[int, int]] | None:
        """{queue: (messages, consumers)} (a queue that does not exist is left out); None: the broker did not answer."""
        with self._lock:
            if time.monotonic() - self._at < self.ttl_s:
                return self._last
            try:
                self._last = self._ask()
            except Exception as exc:  # any broker or socket failure: say the broker is down, drop the connection
                log.debug("queue probe failed: %r", exc)
                self._drop()
                self._last = None
            self._at = time.monotonic()
            return self._last

    def _ask(self) -> dict[str, tuple[int, int]]:
        if self._conn is None:
            conn = self._connect()
            conn.ensure_connection(max_retries=1, timeout=self.timeout_s)
            self._conn = conn
        out: dict[str, tuple[int, int]] = {}
        for name in self.queues:
            channel = self._conn.channel()
            try:
                _, messages, consumers = channel.queue_declare(queue=name, passive=True)
                out[name] = (int(messages), int(consumers))
            except self._conn.channel_errors:  # 404: not declared (yet); the channel is closed by the broker
                pass
            finally:
                try:
                    channel.close()
                except Exception:  # already closed by the 404
                    pass
        return out

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # a dead socket: nothing left to release
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()


class BrokerCollector:
    """prometheus-client collector over a :class:`QueueProbe`."""

    def __init__(self, probe: QueueProbe) -> None:
        self.probe = probe

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        got = self.probe.read()
        up = GaugeMetricFamily("heimdall_broker_up", "Whether the broker answered this worker's queue probe (1) or not")
        up.add_metric([], 0.0 if got is None else 1.0)
        yield up
        if got is None:
            return
        length = GaugeMetricFamily("celery_queue_length", "Messages ready in the queue (not counting those delivered and not yet acknowledged)",
                                   labels=["queue_name"])
        consumers = GaugeMetricFamily("celery_active_consumer_count", "Consumers of the queue", labels=["queue_name"])
        for name, (messages, n) in sorted(got.items()):
            length.add_metric([name], float(messages))
            consumers.add_metric([name], float(n))
        yield length
        yield consumers


class WorkerCollector:
    """Live children and in-flight task messages of this worker, read when scraped."""

    def __init__(self, children: Callable[[], int], in_flight: Callable[[], int]) -> None:
        self._children = children
        self._in_flight = in_flight

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("heimdall_worker_children", "Live pool children of this worker",
                                value=float(self._children()))
        yield GaugeMetricFamily("heimdall_tasks_in_flight", "Task messages this worker holds: prefetched, waiting in "
                                "the micro-batcher or running", value=float(self._in_flight()))
