"""The stores: idempotent writes and recorded rejections, on real PostgreSQL and SQLite."""

from __future__ import annotations

import copy
import uuid

import pytest

from heimdall_inference.errors import TransientError
from heimdall_inference.store import MemoryStore, fix_row, open_store, rejection_row
from heimdall_inference.store.postgres import PostgresStore

from ..live import PG_URL, port_open, unavailable


@pytest.fixture(scope="module")
def fixes(localizer, scenes_and_payloads):
    return localizer.predict_many(scenes_and_payloads[1][:4])


def _exercise(store, fixes):
    info = store.init_schema()
    store.init_schema()  # idempotent
    rows = [fix_row(f) for f in fixes]
    assert store.write_fixes(rows) == 4
    assert store.write_fixes(rows[:2]) == 0  # redelivered: nothing new
    moved = copy.deepcopy(fixes[0])
    moved["captured_at"] = "2026-11-24T07:00:00.000Z"  # same key, another capture time: a new row
    assert store.write_fixes([fix_row(moved)]) == 1
    assert store.count_fixes() == 5
    store.write_rejections([rejection_row({"code": "bad_base64", "message": "x", "field": "receivers[0].iq.data"},
                                          task_id="t", receivers=["torino"], size_bytes=10)])
    return info


def test_postgres_store(fixes):
    host = PG_URL.split("@", 1)[1].split("/", 1)[0]
    if not port_open(host):
        unavailable("PostgreSQL")
    store = PostgresStore(PG_URL, schema=f"t_store_{uuid.uuid4().hex[:8]}")
    try:
        info = _exercise(store, fixes)
        assert info == {"backend": "postgresql", "schema": store.schema, "timescaledb": False}
        got = store.fetch_fix(fixes[1]["request_id"])
        assert got["position"] == fixes[1]["position"]
        row = store._run(lambda c: c.execute(f"SELECT code, field, receivers FROM {store.schema}.rejections").fetchone())
        assert row == ("bad_base64", "receivers[0].iq.data", ["torino"])
    finally:
        store.drop_schema()
        store.close()


def test_postgres_unreachable_is_transient():
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/none", schema="x", timeout_s=1.0)
    try:
        with pytest.raises(TransientError):
            store.count_fixes()
    finally:
        store.close()


def test_sqlite_store(tmp_path, fixes):
    store = open_store(f"sqlite:///{tmp_path / 'p.sqlite3'}")
    try:
        assert _exercise(store, fixes)["backend"] == "sqlite"
        assert [f["request_id"] for f in store.fixes()][:1] == [fixes[0]["request_id"]]
    finally:
        store.close()


def test_memory_store_and_urls(fixes):
    assert isinstance(open_store("memory://"), MemoryStore)
    _exercise(MemoryStore(), fixes)
    with pytest.raises(ValueError):
        open_store("mysql://x")
    with pytest.raises(ValueError):
        PostgresStore(PG_URL, schema="bad;name")
    with pytest.raises(ValueError):
        fix_row({**fixes[0], "request_id": None, "task_id": None})
