"""The stores: idempotent writes, conflicts, rejections once, on real PostgreSQL (plain and TimescaleDB)
and SQLite."""

from __future__ import annotations

import copy
import threading
import uuid

import psycopg
import pytest

from heimdall_inference.errors import ConfigError, StorageError, TransientError
from heimdall_inference.store import FixWrites, MemoryStore, fix_row, open_store, rejection_row
from heimdall_inference.store.postgres import NOT_INSTALLED, NOT_PRELOADED, PostgresStore

from ..live import PG_URL, port_open, report_line, unavailable


@pytest.fixture(scope="module")
def fixes(localizer, scenes_and_payloads):
    return localizer.predict_many(scenes_and_payloads[1][:4])


def _pg(schema_tag: str, url: str = PG_URL, **kwargs) -> PostgresStore:
    if not port_open(url.split("@", 1)[1].split("/", 1)[0]):
        unavailable("PostgreSQL")
    return PostgresStore(url, schema=f"t_{schema_tag}_{uuid.uuid4().hex[:8]}", **kwargs)


def _exercise(store, fixes, **init):
    info = store.init_schema(**init)
    store.init_schema(**init)  # idempotent
    rows = [fix_row(f, f"digest-{i}") for i, f in enumerate(fixes)]
    assert store.write_fixes(rows) == FixWrites(4)
    assert store.write_fixes(rows[:2]) == FixWrites(0)  # redelivered: nothing new, no conflict
    moved = copy.deepcopy(fixes[0])
    moved["captured_at"] = "2026-11-24T07:00:00.000Z"  # same key, another capture time: a new row
    assert store.write_fixes([fix_row(moved, "digest-0")]).new == 1
    # the same request id and capture time with other IQ: a conflict, nothing written
    other = fix_row(fixes[1], "another-digest")
    assert store.write_fixes([rows[2], other, rows[3]]) == FixWrites(0, frozenset({1}))
    assert store.write_fixes([fix_row(fixes[2])]) == FixWrites(0)  # no digest (a task-id key): never a conflict
    # a row stored by an earlier version (a BLAKE2b digest) and its task redelivered to this one (BLAKE3, "b3:"): the
    # digests do not compare, so a duplicate, not a conflict; two BLAKE3 digests that differ: a conflict
    upgraded = copy.deepcopy(fixes[3])
    upgraded["captured_at"] = "2026-11-25T07:00:00.000Z"
    assert store.write_fixes([fix_row(upgraded, "9f" * 16)]).new == 1
    assert store.write_fixes([fix_row(upgraded, "b3:" + "ab" * 16)]) == FixWrites(0)
    again = copy.deepcopy(upgraded)
    again["captured_at"] = "2026-11-26T07:00:00.000Z"
    assert store.write_fixes([fix_row(again, "b3:" + "ab" * 16)]).new == 1
    assert store.write_fixes([fix_row(again, "b3:" + "cd" * 16)]) == FixWrites(0, frozenset({0}))
    assert store.count_fixes() == 7
    bad = {"code": "bad_base64", "message": "x\x00y\ud800", "field": "receivers[0].iq.data"}
    for _ in range(2):  # redelivered: recorded once
        store.write_rejections([rejection_row(bad, task_id="t", request_id="r\x00", receivers=["tor\x00ino"],
                                              size_bytes=10)])
    store.write_rejections([rejection_row({**bad, "code": "conflict"}, task_id="t", request_id="r\x00")])
    store.write_rejections([rejection_row(bad, task_id=None)])  # no key at all: kept, never merged
    store.write_rejections([rejection_row(bad, task_id=None)])
    assert store.count_rejections() == 4
    return info


def test_postgres_store_on_the_servers_own_branch(fixes):
    """True on both branches: a hypertable where the server preloads TimescaleDB, a plain table with the
    reason where it does not."""
    store = _pg("store")
    try:
        info = _exercise(store, fixes)
        available = store._run(lambda c: c.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()[0])
        preloaded = "timescaledb" in store._run(lambda c: c.execute("SHOW shared_preload_libraries").fetchone()[0])
        assert info["timescaledb"] is bool(available and preloaded)
        if info["timescaledb"]:
            figures = _timescaledb_figures(store)
            report_line(f"store test on a real hypertable: {figures}")
            assert figures["hypertable"] and figures["compression"]
            assert figures["jobs"]["policy_compression"]["compress_after"] == "7 days"
            assert figures["jobs"]["policy_retention"]["drop_after"] == "400 days"
        else:
            report_line(f"store test on plain PostgreSQL: {info['timescaledb_note']}")
            assert info["timescaledb_note"].startswith(NOT_PRELOADED if available else NOT_INSTALLED)
        got = store.fetch_fix(fixes[1]["request_id"])
        assert got["position"] == fixes[1]["position"]
        rows = store._run(lambda c: c.execute(f"SELECT reject_key, code, message, request_id, receivers FROM "
                                              f"{store.schema}.rejections ORDER BY id").fetchall())
        assert rows[0] == ("r\ufffd", "bad_base64", "x\ufffdy?", "r\ufffd", ["tor\ufffdino"])
        assert [r[1] for r in rows] == ["bad_base64", "conflict", "bad_base64", "bad_base64"]
    finally:
        store.drop_schema()
        store.close()


def _timescaledb_figures(store: PostgresStore) -> dict:
    def go(c):
        hyper = c.execute("SELECT compression_enabled FROM timescaledb_information.hypertables "
                          "WHERE hypertable_schema = %s AND hypertable_name = 'predictions'", (store.schema,)).fetchone()
        jobs = c.execute("SELECT proc_name, config FROM timescaledb_information.jobs WHERE hypertable_schema = %s "
                         "AND hypertable_name = 'predictions'", (store.schema,)).fetchall()
        return {"hypertable": hyper is not None, "compression": bool(hyper and hyper[0]),
                "jobs": {name: cfg for name, cfg in jobs}}
    return store._run(go)


def test_off_keeps_a_plain_table_on_any_server(fixes):
    store = _pg("plain")
    try:
        assert _exercise(store, fixes, timescaledb="off") == {"backend": "postgresql", "schema": store.schema,
                                                               "timescaledb": False}
        kind = store._run(lambda c: c.execute("SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = "
                                              "i.inhparent WHERE p.relname = 'predictions' AND p.relnamespace = "
                                              "%s::regnamespace", (store.schema,)).fetchone()[0])
        assert kind == 0  # no chunks: a plain table
    finally:
        store.drop_schema()
        store.close()


def test_installed_but_not_preloaded_is_one_clear_line(fixes):
    """A cluster of the test's own without the preload: auto falls back and says why; on refuses."""
    from ..servers import PrivatePostgres

    pg = PrivatePostgres()
    try:
        store = PostgresStore(pg.url, schema="heimdall")
        try:
            installed = store._run(lambda c: c.execute(
                "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()[0])
            why = NOT_PRELOADED if installed else NOT_INSTALLED
            info = store.init_schema(timescaledb="auto")
            assert info["timescaledb"] is False and info["timescaledb_note"] == f"{why}; using a plain table"
            with pytest.raises(ConfigError) as err:
                store.init_schema(timescaledb="on")
            assert why in str(err.value) and "\n" not in str(err.value)
            assert store.write_fixes([fix_row(fixes[0])]).new == 1  # the plain table works
        finally:
            store.close()
    finally:
        pg.close()


def test_a_locked_table_fails_the_write_quickly_as_transient(fixes):
    """statement_timeout: a write that waits on a lock is cancelled (and retried by the task) long before a
    time limit could kill the child holding it."""
    store = _pg("locked", statement_timeout_ms=300)
    try:
        store.init_schema()
        release = threading.Event()
        locked = threading.Event()

        def hold():
            with psycopg.connect(PG_URL) as conn:
                conn.execute(f"LOCK TABLE {store.schema}.predictions IN ACCESS EXCLUSIVE MODE")
                locked.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert locked.wait(10)
            with pytest.raises(TransientError, match="statement timeout"):
                store.write_fixes([fix_row(fixes[0])])
        finally:
            release.set()
            t.join()
        assert store.write_fixes([fix_row(fixes[0])]).new == 1  # the lock gone: the retry writes it
    finally:
        store.drop_schema()
        store.close()


def test_tables_of_an_earlier_version_are_migrated(fixes):
    store = _pg("migrate")
    try:
        store._run(lambda c: c.execute(f"""
            CREATE SCHEMA {store.schema};
            CREATE TABLE {store.schema}.predictions (captured_at timestamptz NOT NULL, fix_key text NOT NULL,
                task_id text, request_id text, lat double precision NOT NULL, lon double precision NOT NULL,
                east_m double precision, north_m double precision, cov_ee_m2 double precision NOT NULL,
                cov_en_m2 double precision NOT NULL, cov_nn_m2 double precision NOT NULL,
                semi_major_95_m double precision, semi_minor_95_m double precision,
                orientation_95_deg double precision, receivers text[] NOT NULL, model_name text NOT NULL,
                model_version text NOT NULL, cached boolean NOT NULL DEFAULT false, timings_ms jsonb,
                fix jsonb NOT NULL, stored_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (fix_key, captured_at));
            CREATE TABLE {store.schema}.rejections (id bigserial PRIMARY KEY, received_at timestamptz NOT NULL
                DEFAULT now(), task_id text, request_id text, code text NOT NULL, message text NOT NULL, field text,
                receivers text[] NOT NULL DEFAULT '{{}}', size_bytes integer);"""))
        store.init_schema(timescaledb="off")
        assert store.write_fixes([fix_row(fixes[0], "d")]).new == 1
        store.write_rejections([rejection_row({"code": "x", "message": "m"}, task_id="t")] * 2)
        assert store.count_rejections() == 1
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
        with pytest.raises(ConfigError):
            store.init_schema(timescaledb="on")
    finally:
        store.close()


def test_sqlite_without_tables_is_not_a_retry(tmp_path, fixes):
    """A worker started before `db init` fails clearly instead of retrying for half an hour."""
    store = open_store(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        with pytest.raises(StorageError, match="db init"):
            store.write_fixes([fix_row(fixes[0])])
    finally:
        store.close()


def test_sqlite_file_of_an_earlier_version_is_migrated(tmp_path, fixes):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.executescript("CREATE TABLE rejections (id INTEGER PRIMARY KEY AUTOINCREMENT, received_at TEXT, "
                           "task_id TEXT, request_id TEXT, code TEXT NOT NULL, message TEXT NOT NULL, field TEXT, "
                           "receivers TEXT NOT NULL DEFAULT '[]', size_bytes INTEGER)")
    store = open_store(f"sqlite:///{path}")
    try:
        store.init_schema()
        store.write_rejections([rejection_row({"code": "x", "message": "m"}, task_id="t")] * 2)
        assert store.count_rejections() == 1
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


def _shadow_exercise(store, fixes, **init) -> None:
    """Shadow rows beside fixes: in the same write, once, never beside a conflicting row; pairs and arm counts."""
    from heimdall_inference.ops.experiments import experiment_report
    from heimdall_inference.store import shadow_row

    store.init_schema(**init)
    served = [{**copy.deepcopy(f), "model": {"name": "localization_model", "version": "1", "alias": "production"}}
              for f in fixes]
    shadows = []
    for f in served:
        s = copy.deepcopy(f)
        s["model"] = {"name": "localization_model", "version": "2", "alias": "challenger"}
        s["position"] = {**s["position"], "east_m": s["position"]["east_m"] + 3000.0}
        shadows.append(shadow_row(s, f))
    rows = [fix_row(f, f"digest-{i}") for i, f in enumerate(served)]
    assert store.write_fixes(rows[:3], shadows[:3]) == FixWrites(3)
    assert store.write_fixes(rows[:3], shadows[:3]) == FixWrites(0)  # redelivered: nothing twice
    conflicting = fix_row(served[0], "another-digest")
    assert store.write_fixes([conflicting, rows[3]], [shadows[0], shadows[3]]).conflicts == frozenset({0})
    pairs = store.shadow_pairs()
    assert len(pairs) == 4 and {p["shadow_model_version"] for p in pairs} == {"2"}
    assert all(p["shadow_east_m"] - p["served_east_m"] == pytest.approx(3000.0, abs=0.11) for p in pairs)
    report = experiment_report(store, since_hours=None)
    assert report["arms"] == [{"model_version": "1", "alias": "production", "fixes": 4, "share": 1.0}]
    (cmp,) = report["shadow"]
    assert cmp["fixes"] == 4 and cmp["distance_m"]["median"] == pytest.approx(3000.0, abs=0.2)
    assert cmp["shadow_inside_served_95"] == 1.0 == cmp["served_inside_shadow_95"]  # ellipses of tens of km
    assert (cmp["served"], cmp["shadow"]) == ({"version": "1", "aliases": ["production"]},
                                             {"version": "2", "aliases": ["challenger"]})
    assert experiment_report(store, since_hours=1.0)["shadow"] == []  # captured days ago: outside the window


def test_shadow_rows_on_every_store(fixes, tmp_path):
    from heimdall_inference.store.sqlite import SqliteStore

    _shadow_exercise(MemoryStore(), fixes)
    sqlite = SqliteStore(tmp_path / "s.sqlite3")
    try:
        _shadow_exercise(sqlite, fixes)
    finally:
        sqlite.close()
    for mode in ("auto", "off"):
        store = _pg("shadow")
        try:
            _shadow_exercise(store, fixes, timescaledb=mode)
            hyper = store._run(lambda c: c.execute(
                "SELECT to_regclass('timescaledb_information.hypertables') IS NOT NULL").fetchone()[0]) and \
                store._run(lambda c: c.execute(
                    "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_schema = %s AND "
                    "hypertable_name = 'shadow_fixes'", (store.schema,)).fetchone()[0])
            ts = store._run(lambda c: c.execute("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
                            .fetchone()[0])
            assert bool(hyper) is (mode == "auto" and bool(ts))  # a hypertable beside predictions where it is one
        finally:
            store.drop_schema()
            store.close()


def test_a_refused_shadow_row_never_takes_the_served_fixes_with_it(fixes, tmp_path):
    """A worker role without INSERT on shadow_fixes, or the table missing: the fixes are stored, the shadow
    rows are not, and the write says why (found in review: it failed every served fix that had a shadow)."""
    from heimdall_inference.store import shadow_row
    from heimdall_inference.store.sqlite import SqliteStore

    rows = [fix_row(f, f"d{i}") for i, f in enumerate(fixes)]
    shadows = [shadow_row(f, f) for f in fixes]
    sqlite = SqliteStore(tmp_path / "s.sqlite3")
    pg = _pg("shadowless")
    try:
        for store in (sqlite, pg):
            store.init_schema(timescaledb="off")
            drop = "DROP TABLE shadow_fixes" if store is sqlite else f"DROP TABLE {store.schema}.shadow_fixes"
            store._run(lambda c: c.execute(drop))
            done = store.write_fixes(rows, shadows)
            assert done.new == 4 and "shadow" in done.shadow_error and store.count_fixes() == 4, done
    finally:
        sqlite.close()
        pg.drop_schema()
        pg.close()
