"""Batch work on its own queue: chord chunks travel on ``heimdall.batch``, and a live fix submitted
while a large batch runs is served before the batch is through (a real worker, real servers)."""

from __future__ import annotations

import copy
import subprocess

import pytest

pytestmark = pytest.mark.integration


def _distinct(docs: list[dict], copies: int, tag: str) -> list[dict]:
    out = []
    for k in range(copies):
        for d in docs:
            d = copy.deepcopy(d)
            d["request_id"] = f"{d['request_id']}-{tag}{k}"
            d["options"] = {"cache": False}
            out.append(d)
    return out


def test_chunks_travel_on_the_batch_queue_and_live_fixes_do_not_wait_behind_them(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import predict, predict_batch
    from heimdall_inference.worker.process import WorkerProcess

    from ..live import isolated_worker, wait_for_depths

    chunk = 16
    docs = scenes_and_payloads[1]
    with isolated_worker("bq", tmp_path / "w.log", concurrency=2, batch_max=8, prefetch_multiplier=4) as (
            settings, store, worker):
        worker.stop()  # publish with no consumer first: where do the messages go?
        batch = _distinct(docs, 20, "b")  # 800 payloads, 50 chunks
        pending = predict_batch(batch, chunk_size=chunk, wait=False)
        vhost = settings.broker_url.rsplit("/", 1)[1]
        want = {settings.batch_queue: len(batch) // chunk, settings.queue: 0}
        assert wait_for_depths(vhost, want) == want

        again = WorkerProcess(settings, tmp_path / "w2.log", concurrency=2)
        try:
            again.wait_ready()
            waited_chunks = []
            for live in _distinct(docs[:6], 1, "live"):
                before = store.count_fixes()
                fix = predict(live, timeout_s=60)
                assert fix["request_id"] == live["request_id"]
                waited_chunks.append((store.count_fixes() - before - 1) / chunk)
            summary = pending.get(timeout=300)
            assert summary["fixes"] == len(batch) and summary["errors"] == 0
            assert store.count_fixes() == len(batch) + 6
            # A live fix finds a free child (or the next one): a chunk or two at most finish while it waits.
            # Behind the batch (one queue, or chunks handed to billiard first) it would wait for 8-50 of them.
            assert max(waited_chunks) <= 3, waited_chunks
            assert sum(waited_chunks) < len(batch) / chunk / 2, waited_chunks
        finally:
            again.stop()


def test_the_batch_queue_has_a_prefetch_window_of_its_own(tmp_path):
    """Celery sets one prefetch count for every consumer on its channel: 64 chunks of ~4 MB would be read at
    once by the main process. The batch queue's consumer gets HEIMDALL_BATCH_PREFETCH_MULTIPLIER x children."""
    from ..live import isolated_worker

    with isolated_worker("bqpf", tmp_path / "w.log", concurrency=2, prefetch_multiplier=4,
                         batch_prefetch_multiplier=3) as (settings, _store, _worker):
        vhost = settings.broker_url.rsplit("/", 1)[1]
        out = subprocess.run(["rabbitmqctl", "-q", "list_consumers", "-p", vhost, "queue_name", "prefetch_count",
                              "--no-table-headers"], check=True, capture_output=True, text=True, timeout=60).stdout
        windows = {q: int(n) for q, n in (line.split() for line in out.splitlines() if line.strip())}
        assert {q: windows.get(q) for q in (settings.queue, settings.batch_queue)} == {
            settings.queue: 8, settings.batch_queue: 6}
