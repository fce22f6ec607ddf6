"""Redis is optional on the hot path: an outage of the result backend and the cache costs results,
never fixes (a worker and a Redis of the test's own; RabbitMQ and PostgreSQL are the shared ones)."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from heimdall_inference.client import predict, submit
from heimdall_inference.errors import ResultUnavailable

from ..live import isolated_worker
from ..servers import PrivateRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RATE_PER_S = 25


class Publisher:
    """Submits payloads with unique request ids at a steady rate, remembering when each one went."""

    def __init__(self, docs: list[dict], tag: str) -> None:
        self.docs, self.tag = docs, tag
        self.sent: list[tuple[str, float]] = []
        self.results: list = []  # kept: their finalizers would talk to Redis mid-outage
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            d = copy.deepcopy(self.docs[i % len(self.docs)])
            d["request_id"] = f"{self.tag}-{i}"
            try:
                self.results.append(submit(d))
                self.sent.append((d["request_id"], time.monotonic()))
            except Exception as exc:  # counted: the test asserts there are none
                self.errors.append(exc)
            i += 1
            self.stop.wait(1 / RATE_PER_S)

    def __enter__(self) -> "Publisher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)

    def close(self) -> None:
        """Close the publisher thread's result backend, then drop its results: no socket is left open."""
        from heimdall_inference.worker.celery_internals import close_result_backend

        for backend in {id(r.backend): r.backend for r in self.results}.values():
            close_result_backend(backend)
        self.results.clear()


def _first_result_after(doc: dict, rid: str, within_s: float = 30.0) -> dict:
    deadline = time.monotonic() + within_s
    while True:
        try:
            return predict({**copy.deepcopy(doc), "request_id": rid}, timeout_s=3)
        except Exception:  # the result was not written yet (or not readable yet): ask again, same request id
            if time.monotonic() > deadline:
                raise


def _stored_keys(store) -> set[str]:
    return {r[0] for r in store._run(lambda c: c.execute(f"SELECT fix_key FROM {store.schema}.predictions").fetchall())}


@pytest.mark.parametrize("outage_s", [20, 60])
def test_a_redis_outage_costs_results_never_fixes(tmp_path, scenes_and_payloads, outage_s):
    """With Redis down 20/40/60 s the workers used to store 5/2/0 fixes during the outage (the child retried
    each result write for ~20 s, then the main process blocked), and producers got RuntimeError."""
    redis = PrivateRedis()
    try:
        with isolated_worker(f"redis{outage_s}", tmp_path / "w.log", concurrency=2, result_backend=redis.url,
                             cache_url=redis.url.replace("/0", "/1"), stop_timeout_s=20) as (_, store, worker):
            docs = scenes_and_payloads[1][:20]
            assert predict({**copy.deepcopy(docs[0]), "request_id": "before"}, timeout_s=30)["request_id"] == "before"
            with Publisher(docs, f"out{outage_s}") as pub:
                time.sleep(2)
                redis.kill()
                down_at = time.monotonic()
                time.sleep(min(5, outage_s / 2))
                with pytest.raises(ResultUnavailable):  # at once: not a 30 s wait, not a RuntimeError
                    predict({**copy.deepcopy(docs[1]), "request_id": f"during-{outage_s}"}, timeout_s=30)
                time.sleep(max(0.0, down_at + outage_s - time.monotonic()))
                # fixes kept flowing: everything published more than 10 s before the end of the outage is stored
                due = {rid for rid, t in pub.sent if t < time.monotonic() - 10}
                stored_during = _stored_keys(store)
                redis.start()
                time.sleep(3)
            pub.close()
            assert not pub.errors, pub.errors[:3]
            assert len(due) > RATE_PER_S * (outage_s - 12) * 0.8, "the publisher itself stalled"
            assert due <= stored_during, f"{len(due - stored_during)} of {len(due)} not stored during the outage"
            sent = {rid for rid, _ in pub.sent} | {"before", f"during-{outage_s}", f"after-{outage_s}"}
            deadline = time.monotonic() + 60
            # Redis is back: results can be awaited again once the worker's probe has seen it (a PING every <= 5 s)
            assert _first_result_after(docs[2], f"after-{outage_s}")["request_id"] == f"after-{outage_s}"
            while _stored_keys(store) != sent and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _stored_keys(store) == sent  # every payload stored once (the key is the table's primary key)
            assert store.count_fixes() == len(sent)
            assert worker.proc.poll() is None
    finally:
        redis.close()
