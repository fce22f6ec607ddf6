"""Micro-batching of concurrent single tasks: one pass, each caller its own answer."""

from __future__ import annotations

import copy
import threading

import pytest

from heimdall_inference.batching import MicroBatcher
from heimdall_inference.errors import PayloadError, TransientError
from heimdall_inference.service import Request, Service
from heimdall_inference.store import MemoryStore


def _run_concurrently(batcher, requests):
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def go(i):
        start.wait()
        try:
            results[i] = batcher.submit(requests[i], timeout_s=60)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_share_passes_and_keep_their_own_answers(localizer, scenes_and_payloads):
    svc = Service(localizer, MemoryStore())
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:24]]
    docs[5]["receivers"] = docs[5]["receivers"][:1]
    batcher = MicroBatcher(lambda: svc, max_batch=8)
    results = _run_concurrently(batcher, [Request(d, f"task-{i}") for i, d in enumerate(docs)])
    assert isinstance(results[5], PayloadError) and results[5].code == "too_few_receivers"
    for i, r in enumerate(results):
        if i != 5:
            assert r["request_id"] == docs[i]["request_id"] and r["task_id"] == f"task-{i}"
    assert svc.store.count_fixes() == 23 and len(svc.store.rejections) == 1
    assert max(batcher.sizes) > 1 and max(batcher.sizes) <= 8 and sum(batcher.sizes) == 24
    # the same fixes as one at a time
    alone = Service(localizer, MemoryStore()).predict(docs[3], task_id="x")
    assert alone["position"] == results[3]["position"]


def test_a_store_failure_fails_every_task_of_the_batch(localizer, scenes_and_payloads):
    class Down(MemoryStore):
        def write_fixes(self, rows):
            raise TransientError("database down")

    batcher = MicroBatcher(lambda: Service(localizer, Down()), max_batch=4)
    results = _run_concurrently(batcher, [Request(d, None) for d in scenes_and_payloads[1][:6]])
    assert all(isinstance(r, TransientError) for r in results)
    with pytest.raises(TransientError):
        batcher.submit(Request(scenes_and_payloads[1][0], None), timeout_s=30)


@pytest.mark.integration
def test_threads_pool_worker_micro_batches_on_the_real_servers(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import submit

    from .live import isolated_worker

    with isolated_worker("batch", tmp_path / "w.log", pool="threads", concurrency=8,
                         extra_env={"HEIMDALL_BATCH_MAX": "8"}) as (_, store, _worker):
        docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:24]]
        results = [submit(d) for d in docs]
        fixes = [r.get(timeout=60) for r in results]
        assert [f["request_id"] for f in fixes] == [d["request_id"] for d in docs]
        assert store.count_fixes() == 24
