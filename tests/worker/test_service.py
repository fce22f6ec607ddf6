"""The service layer without Celery: memory store for the logic, then the real stores."""

from __future__ import annotations

import copy

import pytest

from heimdall_inference.errors import PayloadCode, PayloadError, StorageError, TransientError
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


def test_options_model_must_name_the_served_model(service, scenes_and_payloads):
    """options.model used to be parsed and ignored: a payload asking for another model got this one's fix."""
    base = scenes_and_payloads[1][3]
    for i, ask in enumerate(("production", "2", "localization_model@production", "models:/localization_model/2")):
        fix = service.predict({**copy.deepcopy(base), "request_id": f"ask-{i}", "options": {"model": ask}}, task_id=f"a{i}")
        assert fix["model"] == {"name": "localization_model", "version": "2", "alias": "production"}
    with pytest.raises(PayloadError) as err:
        service.predict({**copy.deepcopy(base), "request_id": "ask-other", "options": {"model": "challenger"}},
                        task_id="other")
    assert err.value.code == PayloadCode.UNKNOWN_MODEL and err.value.field == "options.model"
    assert "challenger" in str(err.value) and service.store.count_rejections() == 1


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


def test_store_failures_surface_and_a_rejection_waits_for_the_database(localizer, scenes_and_payloads):
    svc = Service(localizer, _FailingStore(TransientError("db down")))
    with pytest.raises(TransientError):
        svc.predict(scenes_and_payloads[1][0], task_id="x")
    with pytest.raises(TransientError):  # not recorded yet: the task retries, and records it once the database is back
        svc.predict({"schema": "nope"}, task_id="y")
    svc.store = MemoryStore()
    for _ in range(2):  # the retry, then a redelivery: one row
        with pytest.raises(PayloadError):
            svc.predict({"schema": "nope"}, task_id="y")
    assert svc.store.count_rejections() == 1
    svc = Service(localizer, _FailingStore(StorageError("constraint")))
    with pytest.raises(StorageError):
        svc.predict(scenes_and_payloads[1][0], task_id="x")
    with pytest.raises(PayloadError):  # a rejection row the database refuses for good: the error is still clean
        svc.predict({"schema": "nope"}, task_id="y")


def test_a_request_id_reused_for_other_iq_is_a_recorded_conflict(localizer, scenes_and_payloads):
    """It used to return SUCCESS and store nothing."""
    store = MemoryStore()
    svc = Service(localizer, store)
    docs = scenes_and_payloads[1]
    first = {**copy.deepcopy(docs[0]), "request_id": "reused"}
    svc.predict(first, task_id="t1")
    svc.predict(copy.deepcopy(first), task_id="t2")  # the same payload again: a duplicate, fine
    other = {**copy.deepcopy(docs[1]), "request_id": "reused", "captured_at": first["captured_at"]}
    for task_id in ("t3", "t3"):  # redelivered: one rejection row
        with pytest.raises(PayloadError) as err:
            svc.predict(other, task_id=task_id)
        assert err.value.code == PayloadCode.CONFLICT and err.value.field == "request_id"
    assert store.count_fixes() == 1 and [r["code"] for r in store.rejections] == ["conflict"]
    summary = svc.predict_chunk([copy.deepcopy(other), copy.deepcopy(docs[2])], task_id="c", offset=5)
    assert summary["fixes"] == 1 and [(e["index"], e["code"]) for e in summary["errors"]] == [(5, "conflict")]


class _Interrupt(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded (an Exception subclass)."""


@pytest.mark.parametrize("where", ["decode", "locate", "store", "reject"])
def test_an_interrupt_ends_the_pass_and_is_never_one_requests_outcome(localizer, scenes_and_payloads, monkeypatch,
                                                                        where):
    store = MemoryStore()
    svc = Service(localizer, store, interrupts=(_Interrupt,))

    def boom(*a, **k):
        raise _Interrupt("soft time limit")

    target = {"decode": (localizer, "decode"), "locate": (localizer, "fixes"), "store": (store, "write_fixes"),
              "reject": (store, "write_rejections")}[where]
    monkeypatch.setattr(*target, boom)
    reqs = _requests(scenes_and_payloads[1][:3])
    if where == "reject":
        reqs[1] = type(reqs[1])({"schema": "nope"}, "bad")
    with pytest.raises(_Interrupt):
        svc.predict_requests(reqs)
    with pytest.raises(_Interrupt):
        svc.predict_chunk([r.payload for r in reqs], task_id="c")


def test_model_info_and_cache_key(service, spec, localizer):
    info = service.model_info()
    assert info["alias"] == "production" and info["version"] == spec.version
    assert "path" not in info and "/" not in str(info.get("sha256"))  # no file path of the worker's disk
    # the cache key names the model file, not only its version string
    assert service.model_version == f"{spec.version}-{localizer.session.sha256[:12]}"


class _RefusingStore(MemoryStore):
    """Refuses any transaction holding a row whose key is in ``refuse`` (as a CHECK constraint would)."""

    def __init__(self, refuse: set[str]) -> None:
        super().__init__()
        self.refuse = refuse
        self.transactions = 0

    def write_fixes(self, rows):
        self.transactions += 1
        if any(r["fix_key"] in self.refuse for r in rows):
            raise StorageError("new row violates check constraint")
        return super().write_fixes(rows)


class _FakeCache:
    def __init__(self) -> None:
        self.puts: list[str] = []

    def get_many(self, model_version, digests):
        return [None] * len(digests)

    def put_many(self, model_version, items):
        self.puts += [digest for digest, _ in items]

    def close(self):
        pass


def _requests(docs, prefix="r"):
    from heimdall_inference.worker.service import Request

    return [Request({**copy.deepcopy(d), "request_id": f"{prefix}{i}"}, f"task-{prefix}{i}") for i, d in enumerate(docs)]


def test_a_row_the_database_refuses_fails_alone_in_its_micro_batch(localizer, scenes_and_payloads):
    store = _RefusingStore({"r2"})
    cache = _FakeCache()
    svc = Service(localizer, store, cache)
    out = svc.predict_requests(_requests(scenes_and_payloads[1][:6]))
    assert isinstance(out[2], StorageError)
    assert [o["request_id"] for i, o in enumerate(out) if i != 2] == ["r0", "r1", "r3", "r4", "r5"]
    assert sorted(k for k, _ in store.fixes) == ["r0", "r1", "r3", "r4", "r5"]
    assert len(cache.puts) == 5  # the refused fix is not cached either
    assert store.transactions == 1 + 6  # the batch, then each row alone (idempotent)
    with pytest.raises(StorageError):
        svc.predict({**copy.deepcopy(scenes_and_payloads[1][0]), "request_id": "r2"}, task_id="alone")


def test_a_non_finite_model_output_fails_its_request_alone_and_is_never_stored_or_cached(
        localizer, scenes_and_payloads, monkeypatch):
    import numpy as np

    from heimdall_inference.errors import InferenceError

    real_run = localizer.session.run

    def run(features, mask):  # the model's answer for the second payload of each batch is NaN
        mean, cov = real_run(features, mask)
        mean = mean.copy()
        if len(mean) > 1:
            mean[1] = np.nan
        return mean, cov

    monkeypatch.setattr(localizer.session, "run", run)
    store, cache = MemoryStore(), _FakeCache()
    svc = Service(localizer, store, cache)
    out = svc.predict_requests(_requests(scenes_and_payloads[1][:4]))
    assert isinstance(out[1], InferenceError) and "non-finite" in str(out[1])
    assert all(isinstance(out[i], dict) for i in (0, 2, 3))
    assert sorted(k for k, _ in store.fixes) == ["r0", "r2", "r3"] and len(cache.puts) == 3
    summary = svc.predict_chunk([copy.deepcopy(d) for d in scenes_and_payloads[1][4:8]], task_id="c", offset=10)
    assert summary["fixes"] == 3 and [(e["index"], e["code"], e["error"]) for e in summary["errors"]] == [
        (11, "internal_error", "InferenceError")]


def test_a_chunk_row_the_database_refuses_is_that_payloads_error(localizer, scenes_and_payloads):
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:5]]
    for i, d in enumerate(docs):
        d["request_id"] = f"k{i}"
    svc = Service(localizer, _RefusingStore({"k3"}))
    summary = svc.predict_chunk(docs, task_id="c", offset=0)
    assert summary["fixes"] == 4 and [(e["index"], e["error"]) for e in summary["errors"]] == [(3, "StorageError")]


def test_a_fault_decoding_one_request_is_that_requests_alone(localizer, scenes_and_payloads, monkeypatch):
    """A bug of ours (or an unreachable iq_ref store) on one payload used to escape the batch and fail
    every request in it; now it stays in its slot, and only a PayloadError is recorded as a rejection."""
    real_decode = localizer.decode

    def decode(raw, *, digest=True):
        if raw.get("request_id") == "r1":
            raise RuntimeError("a bug in the decoder")
        if raw.get("request_id") == "r3":
            raise TransientError("object store unreachable")
        return real_decode(raw, digest=digest)

    monkeypatch.setattr(localizer, "decode", decode)
    store = MemoryStore()
    out = Service(localizer, store).predict_requests(_requests(scenes_and_payloads[1][:5]))
    assert isinstance(out[1], RuntimeError) and isinstance(out[3], TransientError)
    assert [o["request_id"] for o in (out[0], out[2], out[4])] == ["r0", "r2", "r4"]
    assert store.count_rejections() == 0 and store.count_fixes() == 3
    docs = [{**copy.deepcopy(d), "request_id": f"r{i}"} for i, d in enumerate(scenes_and_payloads[1][:3])]
    summary = Service(localizer, MemoryStore()).predict_chunk(docs[:3], task_id="c")
    assert summary["fixes"] == 2 and [(e["index"], e["error"]) for e in summary["errors"]] == [(1, "RuntimeError")]


def test_a_model_failure_on_the_batch_is_retried_payload_by_payload(localizer, scenes_and_payloads, monkeypatch):
    from heimdall_inference.errors import InferenceError

    real_fixes = localizer.fixes

    def fixes(decoded, **kw):  # onnxruntime fails on any batch that holds the payload r2
        if any(d.request_id == "r2" for d in decoded):
            raise InferenceError("onnxruntime failed on a batch")
        return real_fixes(decoded, **kw)

    monkeypatch.setattr(localizer, "fixes", fixes)
    out = Service(localizer, MemoryStore()).predict_requests(_requests(scenes_and_payloads[1][:4]))
    assert isinstance(out[2], InferenceError) and all(isinstance(out[i], dict) for i in (0, 1, 3))


def test_distinct_invalid_request_ids_are_never_merged_into_one_rejection(service):
    """Found by the fuzz suite: two 500-character request ids sharing their first 128 characters were
    recorded as one rejection (the row's key was the id cut to 128)."""
    for i in range(2):
        with pytest.raises(PayloadError):
            service.predict({"schema": "heimdall.iq/v1", "request_id": "r" * 500 + str(i)}, task_id=f"task-{i}")
    assert [r["reject_key"] for r in service.store.rejections] == ["task-0", "task-1"]


class _CountingRejections(MemoryStore):
    """Counts rejection writes; refuses for good any write holding a row keyed in ``refuse`` (a constraint would)."""

    def __init__(self, refuse: frozenset[str] = frozenset(), down: bool = False) -> None:
        super().__init__()
        self.refuse, self.down, self.writes = refuse, down, []

    def write_rejections(self, rows):
        if self.down:
            raise TransientError("the database is unreachable")
        self.writes.append(len(rows))
        if any(r["reject_key"] in self.refuse for r in rows):
            raise StorageError("refused")
        super().write_rejections(rows)


def _mixed(scenes_and_payloads, tag: str) -> list:
    from heimdall_inference.worker.service import Request

    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:6]]
    for k, d in enumerate(docs):
        d["request_id"] = f"{tag}-{k}"
        if k % 2:
            d["receivers"] = d["receivers"][:2]  # invalid: too few receivers
    return [Request(d, f"{tag}-t{k}", None) for k, d in enumerate(docs)]


def test_a_batch_records_its_rejections_in_one_write(localizer, scenes_and_payloads):
    store = _CountingRejections()
    out = Service(localizer, store).predict_requests(_mixed(scenes_and_payloads, "rb"))
    assert [isinstance(o, dict) for o in out] == [True, False] * 3
    assert all(o.code == "too_few_receivers" for o in out[1::2])
    assert store.writes == [3] and [r["reject_key"] for r in store.rejections] == ["rb-1", "rb-3", "rb-5"]
    docs = [r.payload for r in _mixed(scenes_and_payloads, "rc")]
    summary = Service(localizer, store).predict_chunk(docs, task_id="c", offset=0)
    assert summary["fixes"] == 3 and [e["index"] for e in summary["errors"]] == [1, 3, 5]
    assert store.writes == [3, 3] and len(store.rejections) == 6


def test_a_refused_rejection_row_costs_no_other_its_record_and_an_outage_retries_each(localizer, scenes_and_payloads):
    store = _CountingRejections(refuse=frozenset({"rr-3"}))
    service = Service(localizer, store)
    out = service.predict_requests(_mixed(scenes_and_payloads, "rr"))
    assert all(o.code == "too_few_receivers" for o in out[1::2])  # each still gets its typed error
    assert store.writes == [3, 1, 1, 1] and [r["reject_key"] for r in store.rejections] == ["rr-1", "rr-5"]
    assert service.counters.rejected == {"too_few_receivers": 3}
    down = Service(localizer, _CountingRejections(down=True)).predict_requests(_mixed(scenes_and_payloads, "rd"))
    assert [type(o).__name__ for o in down[1::2]] == ["TransientError"] * 3  # those tasks retry, and record then
    assert all(isinstance(o, dict) for o in down[0::2])
