"""The message guard: nothing a producer sends can kill a worker or take its neighbours with it."""

from __future__ import annotations

import copy
import time
import uuid

import pytest
from kombu.serialization import loads

from heimdall_inference.errors import PayloadCode, PayloadError
from heimdall_inference.worker.guard import MAX_DEPTH, refusal, shape_problem


def _nested(depth: int) -> list:
    x: list = []
    for _ in range(depth - 1):
        x = [x]
    return x


def test_shape_is_walked_without_recursion_and_bounded():
    assert shape_problem(_nested(MAX_DEPTH)) is None
    assert shape_problem(_nested(MAX_DEPTH + 1)) == f"nested deeper than {MAX_DEPTH} levels"
    assert shape_problem(_nested(200_000)) is not None  # far past the interpreter's recursion limit
    assert shape_problem([[{"a": 1}] * 10], max_items=20) == "more than 20 elements"
    assert shape_problem({"k": "v" * 10_000_000}) is None  # strings are not walked, the size cap bounds them


def test_a_predict_body_passes(payload):
    body = [[payload], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    assert shape_problem(body) is None


@pytest.mark.parametrize("raw, code", [
    (b"{not json", PayloadCode.DECODE_ERROR),
    (b"\xff\xfe", PayloadCode.DECODE_ERROR),
    (b"[" * 100_000 + b"]" * 100_000, PayloadCode.DECODE_ERROR),  # too deep for the JSON decoder itself
    (b"[" * 900 + b"]" * 900, PayloadCode.DECODE_ERROR),  # decodes, but pickling it would not
    (b"[" + b"1," * 300_000 + b"1]", PayloadCode.DECODE_ERROR),  # too many elements
])
def test_a_bad_body_is_a_typed_refusal(raw, code):
    err = refusal(raw, lambda: loads(raw, "application/json", "utf-8"), max_body_bytes=None)
    assert isinstance(err, PayloadError) and err.code == code and err.context["size_bytes"] == len(raw)


def test_the_size_cap_is_checked_before_decoding():
    def never():
        raise AssertionError("decoded a body over the cap")

    err = refusal(b"x" * 101, never, max_body_bytes=100)
    assert err.code == PayloadCode.PAYLOAD_TOO_LARGE and err.context["max_bytes"] == 100


@pytest.mark.integration
@pytest.mark.parametrize("batch_max", [32, 1])
def test_poison_messages_are_refused_alone_and_the_worker_survives(tmp_path, scenes_and_payloads, batch_max):
    """A 900-deep list killed the worker in a loop (RecursionError pickling it for a child) and took the
    messages prefetched with it; undecodable bodies were acked and dropped. Now each ends as a typed
    failure and a dead letter of its own, and every valid neighbour gets its fix."""
    from celery.result import AsyncResult
    from kombu import Producer

    from heimdall_inference.client import submit
    from heimdall_inference.worker.tasks import predict
    from heimdall_inference.worker.topology import DEAD_QUEUE, dead_queue

    from ..live import isolated_worker

    with isolated_worker(f"guard{batch_max}", tmp_path / "w.log", concurrency=2, batch_max=batch_max,
                         prefetch_multiplier=32) as (settings, store, worker):
        app = predict.app
        docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:20]]
        for i, d in enumerate(docs):
            d["request_id"] = f"guard-{batch_max}-{i}"
        poison: list[str] = []
        valid = []
        with app.connection_for_write() as conn:
            producer = Producer(conn.default_channel)
            for i, d in enumerate(docs):
                valid.append(submit(d))
                if i % 7 == 3:  # poison among the valid ones, in one prefetch window
                    poison.append(predict.apply_async((_nested(900),), serializer="json", argsrepr="(deep)").id)
                    for raw in (b"{not json", b"[" * 100_000 + b"]" * 100_000):
                        tid = str(uuid.uuid4())
                        producer.publish(raw, exchange="heimdall", routing_key="heimdall.predict.task",
                                         content_type="application/json", content_encoding="utf-8",
                                         headers={"task": "heimdall.predict", "id": tid, "lang": "py"})
                        poison.append(tid)
        fixes = [r.get(timeout=60) for r in valid]
        assert [f["request_id"] for f in fixes] == [d["request_id"] for d in docs]
        for tid in poison:
            with pytest.raises(PayloadError) as err:
                AsyncResult(tid, app=app).get(timeout=30)
            assert err.value.code == PayloadCode.DECODE_ERROR
        assert worker.proc.poll() is None, worker.log()
        assert "Unrecoverable error" not in worker.log()
        assert store.count_fixes() == len(docs)
        deadline = time.monotonic() + 20
        while True:
            with app.connection_for_write() as conn:
                _, dead, _ = dead_queue()(conn.default_channel).queue_declare(passive=True)
            if dead >= len(poison) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert dead == len(poison), f"{dead} messages in {DEAD_QUEUE}"


class _Message:
    def __init__(self, task_id, body=b'[[{}], {}, {}]'):
        self.headers = {"id": task_id, "task": "heimdall.predict"}
        self.body = body

    @property
    def payload(self):
        return loads(self.body, "application/json", "utf-8")


@pytest.mark.parametrize("task_id", ["x" * 256, "nul\x00id", "", 7])
def test_a_task_id_that_cannot_key_a_row_is_refused(task_id):
    from heimdall_inference.worker.guard import message_refusal, usable_task_id

    err = message_refusal(_Message(task_id), max_body_bytes=None)
    assert err is not None and err.code == PayloadCode.DECODE_ERROR and err.field == "id"
    assert not usable_task_id(task_id)
    assert message_refusal(_Message(str(uuid.uuid4())), max_body_bytes=None) is None
