"""A micro-batch gives each request the outcome it would have alone (real worker, real servers)."""

from __future__ import annotations

import base64
import copy

import numpy as np
import pytest

from heimdall_inference.errors import PayloadCode, PayloadError, StorageError

pytestmark = pytest.mark.integration


def _huge(doc: dict) -> dict:
    """Finite complex64 samples at 1e20 x full scale: they used to give a NaN fix that PostgreSQL
    refused, failing every request of the micro-batch."""
    doc = copy.deepcopy(doc)
    rec = doc["receivers"][0]
    n = 2 * doc_samples(rec)
    rec["iq"] = {"dtype": "complex64", "data": base64.b64encode(np.full(n, 1e20, "<f4").tobytes()).decode()}
    rec.pop("gain_db", None)
    return doc


def doc_samples(rec: dict) -> int:
    raw = base64.b64decode(rec["iq"]["data"])
    return len(raw) // (4 if rec["iq"]["dtype"] == "ci16" else 8)


def test_one_bad_request_never_fails_its_micro_batch_neighbours(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    with isolated_worker("isolation", tmp_path / "w.log", concurrency=1, batch_max=32,
                         prefetch_multiplier=64) as (_, store, worker):
        store._run(lambda c: c.execute(f"ALTER TABLE {store.schema}.predictions "
                                       "ADD CONSTRAINT refuse_one CHECK (fix_key <> 'refused-by-db')"))
        docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:30]]
        for i, d in enumerate(docs):
            d["request_id"] = f"iso-{i}"
        docs[7]["request_id"] = "refused-by-db"
        docs[12] = {**_huge(docs[12]), "request_id": "out-of-range"}
        docs[21] = {**_huge(docs[21]), "request_id": "out-of-range-2"}
        results = [submit(d) for d in docs]  # one burst: the single child takes them in batches
        outcomes = {}
        for d, r in zip(docs, results):
            try:
                outcomes[d["request_id"]] = r.get(timeout=60)
            except (PayloadError, StorageError) as exc:
                outcomes[d["request_id"]] = exc
        assert isinstance(outcomes.pop("refused-by-db"), StorageError)
        for rid in ("out-of-range", "out-of-range-2"):
            err = outcomes.pop(rid)
            assert isinstance(err, PayloadError) and err.code == PayloadCode.OUT_OF_RANGE
        assert all(isinstance(f, dict) and f["request_id"] == rid for rid, f in outcomes.items())
        assert max(f["batch_size"] for f in outcomes.values()) > 1, "no micro-batch formed: the test proves nothing"
        assert store.count_fixes() == 27 and store.count_rejections() == 2
        stored = store._run(lambda c: c.execute(f"SELECT count(*) FROM {store.schema}.predictions "
                                                "WHERE lat = 'NaN' OR lon = 'NaN'").fetchone()[0])
        assert stored == 0
        assert worker.proc.poll() is None
