"""The Redis result backend with deferred writes, on the real Redis."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import Celery, states

from heimdall_inference.worker.result_backend import DeferredRedisBackend, deferred_writes

from ..live import REDIS_URL, port_open, unavailable

pytestmark = pytest.mark.integration


@pytest.fixture
def backend():
    if not port_open(REDIS_URL.split("//", 1)[1].split("/", 1)[0]):
        unavailable("Redis")
    prefix = f"heimdall-test-{uuid.uuid4().hex[:8]}:"
    app = Celery("t", set_as_current=False)
    app.conf.update(result_backend="heimdall_inference.worker.result_backend:DeferredRedisBackend+" + REDIS_URL,
                    result_serializer="json", result_accept_content=["json"],
                    result_backend_transport_options={"global_keyprefix": prefix})
    b = app.backend
    yield b
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{prefix}*"))
    if keys:
        r.delete(*keys)
    r.close()


def test_the_url_selects_the_deferred_backend(backend):
    assert isinstance(backend, DeferredRedisBackend)


def test_writes_in_a_block_land_together_at_its_end(backend):
    ids = [uuid.uuid4().hex for _ in range(5)]
    with backend.deferred_writes():
        for i, tid in enumerate(ids[:4]):
            backend.mark_as_done(tid, {"n": i})
        backend.mark_as_failure(ids[4], ValueError("bad"))
        assert all(backend.get_task_meta(t)["status"] == states.PENDING for t in ids)  # nothing written yet
    assert [backend.get_task_meta(t)["result"] for t in ids[:4]] == [{"n": i} for i in range(4)]
    assert backend.get_task_meta(ids[4])["status"] == states.FAILURE
    # keys carry the deployment's prefix, as Celery's own writes do
    assert backend.get_key_for_task(ids[0]).decode().startswith(backend.app.conf.result_backend_transport_options["global_keyprefix"])


@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")  # Celery's own write path
def test_a_success_is_never_overwritten_and_the_last_state_in_a_block_wins(backend):
    done, retried = uuid.uuid4().hex, uuid.uuid4().hex
    backend.mark_as_done(done, "first")  # outside a block: Celery's own path
    with deferred_writes(backend):
        backend.mark_as_failure(done, ValueError("late duplicate"))
        backend.mark_as_retry(retried, ValueError("db down"))
        backend.mark_as_done(retried, "second")
    assert backend.get_task_meta(done)["result"] == "first"
    assert backend.get_task_meta(retried)["result"] == "second"


def test_deferred_writes_is_a_no_op_block_for_other_backends():
    class Plain:
        pass

    with deferred_writes(Plain()):
        pass


def test_a_fix_is_stored_by_msgspec_as_the_same_document_and_anything_else_by_celery(backend, localizer,
                                                                                      scenes_and_payloads):
    """A fix's success document takes the fast encoder, in and out of a block; it reads back value for value
    (floats exactly) and as the same JSON kombu would write. Failures and other results keep Celery's."""
    import json

    from kombu.utils.json import dumps as kombu_dumps

    from heimdall_inference.worker.result_backend import fast_fix_meta

    fixes = localizer.predict_many([dict(d) for d in scenes_and_payloads[1][:6]])
    r = redis.Redis.from_url(REDIS_URL)
    try:
        ids = [uuid.uuid4().hex for _ in fixes]
        backend.mark_as_done(ids[0], fixes[0])  # a single task: Celery's write path
        with deferred_writes(backend):  # a micro-batch
            for tid, fix in zip(ids[1:], fixes[1:]):
                backend.mark_as_done(tid, fix)
        for tid, fix in zip(ids, fixes):
            raw = r.get(backend.get_key_for_task(tid))
            assert raw.startswith(b'{"status":"SUCCESS","result":{')  # msgspec's compact document
            stored = json.loads(raw)
            assert stored["result"] == fix and json.loads(kombu_dumps(stored)) == stored
            assert backend.get_task_meta(tid)["result"] == fix
        other, failed = uuid.uuid4().hex, uuid.uuid4().hex
        backend.mark_as_done(other, {"n": 1})
        backend.mark_as_failure(failed, ValueError("bad"))
        assert r.get(backend.get_key_for_task(other)).startswith(b'{"status": "SUCCESS"')  # kombu's encoder
        assert backend.get_task_meta(failed)["status"] == states.FAILURE
    finally:
        r.close()
    meta = {"status": "SUCCESS", "result": fixes[0], "traceback": None, "children": [], "date_done": "x",
            "task_id": "t"}
    assert fast_fix_meta(meta)
    assert not fast_fix_meta({**meta, "args": [b"\x00"]})  # result_extended: the payload's bytes are kombu's
    assert not fast_fix_meta({**meta, "status": "FAILURE"})
    assert not fast_fix_meta({**meta, "result": {**fixes[0], "schema": "other"}})
