"""A slow database never loses work: a soft time limit or a statement timeout ends in a retry, and every
payload is stored exactly once after the table is released (real worker, real servers)."""

from __future__ import annotations

import copy
import threading

import psycopg
import pytest

from heimdall_inference.client import submit, wait

from ..live import PG_URL, isolated_worker

pytestmark = pytest.mark.integration


class TableLock:
    """Holds ACCESS EXCLUSIVE on ``predictions`` in a connection of its own until released."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.locked = threading.Event()
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, daemon=True)

    def _hold(self) -> None:
        with psycopg.connect(PG_URL) as conn:
            conn.execute(f"LOCK TABLE {self.schema}.predictions IN ACCESS EXCLUSIVE MODE")
            self.locked.set()
            self.release.wait(120)

    def __enter__(self) -> "TableLock":
        self.thread.start()
        assert self.locked.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.thread.join(30)


def _docs(scenes_and_payloads, tag: str, n: int) -> list[dict]:
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:n]]
    for i, d in enumerate(docs):
        d["request_id"] = f"{tag}-{i}"
    return docs


@pytest.mark.slow
@pytest.mark.parametrize("batch_max", [16, 1])
def test_a_soft_time_limit_on_a_locked_table_retries_every_request(tmp_path, scenes_and_payloads, batch_max):
    """With predictions locked past the soft limit, single tasks and micro-batches used to raise
    SoftTimeLimitExceeded and be acked with no row (2 payloads lost). Now each request retries."""
    with isolated_worker(f"softlimit{batch_max}", tmp_path / "w.log", concurrency=1, batch_max=batch_max,
                         task_soft_time_limit_s=2.0, task_time_limit_s=10.0,
                         db_statement_timeout_ms=0) as (settings, store, worker):
        docs = _docs(scenes_and_payloads, f"soft{batch_max}", 12)
        with TableLock(settings.db_schema):
            results = [submit(d) for d in docs]
            # the first pass blocks on the lock until its soft limit: wait for it in the log
            _wait_for(lambda: "soft time limit" in _log(worker), 30)
        fixes = [wait(r, timeout_s=120) for r in results]
        assert sorted(f["request_id"] for f in fixes) == sorted(d["request_id"] for d in docs)
        assert store.count_fixes() == len(docs) and store.count_rejections() == 0
        assert "retry in" in _log(worker) and worker.proc.poll() is None


@pytest.mark.slow
def test_a_statement_timeout_makes_a_locked_table_a_retry_before_any_time_limit(tmp_path, scenes_and_payloads):
    with isolated_worker("stmt", tmp_path / "w.log", concurrency=1, batch_max=16,
                         db_statement_timeout_ms=500) as (settings, store, worker):
        docs = _docs(scenes_and_payloads, "stmt", 8)
        with TableLock(settings.db_schema):
            results = [submit(d) for d in docs]
            _wait_for(lambda: "statement timeout" in _log(worker), 30)
        fixes = [wait(r, timeout_s=120) for r in results]
        assert sorted(f["request_id"] for f in fixes) == sorted(d["request_id"] for d in docs)
        assert store.count_fixes() == len(docs)
        assert "soft time limit" not in _log(worker)


def _log(worker) -> str:
    return worker.log_path.read_text(errors="replace").lower()


def test_a_producer_sends_no_time_limits_the_worker_would_obey(live):
    """Celery copied the producer's task_time_limit/task_soft_time_limit into every message, and a worker
    obeys the message over its own settings: any producer silently overrode the worker's limits."""
    from heimdall_inference.worker.tasks import noop, predict

    app = predict.app
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        noop.apply_async(routing_key="nowhere")  # the producer declares its exchange as it publishes
        ch.queue_declare("limits-probe", auto_delete=True)
        ch.queue_bind("limits-probe", "heimdall", "limits.#")
        try:
            noop.apply_async(routing_key="limits.probe")
            noop.apply_async(routing_key="limits.probe", time_limit=9, soft_time_limit=4)
            got = [_get(ch, "limits-probe") for _ in range(2)]
        finally:
            ch.queue_delete("limits-probe")
    assert got[0].headers["timelimit"] in ([None, None], (None, None))
    assert list(got[1].headers["timelimit"]) == [9, 4]  # an explicit per-call limit still goes through


def _get(channel, queue: str):
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = channel.basic_get(queue, no_ack=True)
        if m is not None:
            return m
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue}")


def _wait_for(cond, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.2)
