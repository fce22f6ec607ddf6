"""The service layer without Celery: memory store for the logic, then the real stores."""

from __future__ import annotations

import copy

import pytest

from heimdall_inference.errors import PayloadError, StorageError, TransientError
from heimdall_inference.worker.service import Service, summarize
from heimdall_inference.store import MemoryStore


@pytest.fixture()
def service(localizer) -> Service:
    return Service(localizer, MemoryStore(), alias="production")


def test_predict_stores_one_row_per_key(service, scenes_and_payloads):
    _, docs = scenes_and_payloads
    fix = service.predict(docs[0], task_id="t1", sent_at_s=None)
    assert fix["model"]["alias"] == "production" and "store" in fix["timings_ms"]
    again = service.predict(docs[0], task_id="t2")  # same request id: a resubmission
    assert again["position"] == fix["position"]
    assert service.store.count_fixes() == 1
    assert (service.counters.stored_new, service.counters.stored_duplicate) == (1, 1)


def test_without_request_id_the_task_id_is_the_key(service, scenes_and_payloads):
    doc = copy.deepcopy(scenes_and_payloads[1][1])
    doc.pop("request_id")
    service.predict(doc, task_id="same")
    service.predict(doc, task_id="same")
    service.predict(doc, task_id="other")
    assert service.store.count_fixes() == 2


def test_rejections_are_recorded_with_context_not_iq(service, scenes_and_payloads):
    doc = {**scenes_and_payloads[1][2], "receivers": scenes_and_payloads[1][2]["receivers"][:2]}
    with pytest.raises(PayloadError):
        service.predict(doc, task_id="bad")
    with pytest.raises(PayloadError):
        service.predict(b"\x00garbage", task_id="worse")
    rej = service.store.rejections
    assert [r["code"] for r in rej] == ["too_few_receivers", "decode_error"]
    assert rej[0]["receivers"] == [r["id"] for r in doc["receivers"]] and rej[0]["request_id"] == doc["request_id"]
    assert rej[1]["size_bytes"] == 8
    assert all(len(repr(r)) < 600 for r in rej)  # context, never the IQ
    assert service.counters.rejected == {"too_few_receivers": 1, "decode_error": 1}


def test_chunk_keys_survive_redelivery(service, scenes_and_payloads):
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:6]]
    for d in docs:
        d.pop("request_id")
    docs[4]["schema"] = "x"
    first = service.predict_chunk(docs, task_id="chunk-1", offset=100)
    assert (first["payloads"], first["fixes"]) == (6, 5)
    assert first["errors"][0]["index"] == 104 and first["errors"][0]["code"] == "unknown_schema"
    service.predict_chunk(docs, task_id="chunk-1", offset=100)  # redelivered
    assert service.store.count_fixes() == 5
    s = summarize([first, first])
    assert (s["payloads"], s["fixes"], s["errors"], s["chunks"]) == (12, 10, 2, 2)


class _FailingStore(MemoryStore):
    def __init__(self, exc):
        super().__init__()
        self.exc = exc

    def write_fixes(self, rows):
        raise self.exc

    def write_rejections(self, rows):
        raise self.exc


def test_store_failures_surface_and_rejection_recording_never_crashes(localizer, scenes_and_payloads):
    svc = Service(localizer, _FailingStore(TransientError("db down")))
    with pytest.raises(TransientError):
        svc.predict(scenes_and_payloads[1][0], task_id="x")
    with pytest.raises(PayloadError):  # the rejection could not be recorded, the error is still clean
        svc.predict({"schema": "nope"}, task_id="y")
    svc = Service(localizer, _FailingStore(StorageError("constraint")))
    with pytest.raises(StorageError):
        svc.predict(scenes_and_payloads[1][0], task_id="x")


def test_model_info_and_cache_key(service, spec, localizer):
    info = service.model_info()
    assert info["alias"] == "production" and info["version"] == spec.version
    # the cache key names the model file, not only its version string
    assert service.model_version == f"{spec.version}-{localizer.session.sha256[:12]}"
