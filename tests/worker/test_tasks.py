"""heimdall.* tasks end to end: real RabbitMQ (quorum queue), real Redis, real PostgreSQL, real worker."""

from __future__ import annotations

import copy
import time
import uuid

import numpy as np
import pytest

from heimdall_inference.client import predict, predict_batch, submit
from heimdall_inference.errors import PayloadError
from heimdall_inference.lab.evaluation import crb_position
from heimdall_inference.lab.simulator import Priors, scene_payloads, simulate

pytestmark = pytest.mark.integration


def _rows(store, where: str = "true", *args) -> list[tuple]:
    return store._run(lambda c: c.execute(f"SELECT fix_key, lat, lon, cached, model_version FROM {store.schema}."
                                          f"predictions WHERE {where}", args).fetchall())


def test_a_submitted_payload_comes_back_as_a_fix_and_a_row(live, live_worker, spec, signal):
    servers, store = live
    inside = Priors(margin_m=0.0)
    scenes, iq = simulate(spec.network, 1, seed=404, priors=inside, signal=signal, n_online=7)
    doc = scene_payloads(scenes, iq, spec.network, signal, seed=404, request_prefix="live")[0]
    fix = predict(doc, timeout_s=30)
    crb = float(np.sqrt(np.trace(crb_position(spec.network, scenes, inside)[0]))) / 1e3
    err = float(np.hypot(fix["position"]["east_m"] - scenes.east_m[0], fix["position"]["north_m"] - scenes.north_m[0])) / 1e3
    assert err < 3 * crb + 5.0, (err, crb)
    assert fix["task_id"] and fix["request_id"] == "live-404-0" and fix["cached"] is False
    assert {"decode", "features", "inference", "store", "queue"} <= set(fix["timings_ms"])
    rows = _rows(store, "fix_key = %s", "live-404-0")
    assert len(rows) == 1
    assert rows[0][1] == pytest.approx(fix["position"]["lat"]) and rows[0][2] == pytest.approx(fix["position"]["lon"])


def test_a_70cm_payload_gets_its_fix_from_the_70cm_model(live, live_worker, spec, signal):
    """The worker holds both bands' models (HEIMDALL_BAND_MODELS, the shipped ones by default) and routes by centre
    frequency: the fix and its row name the 70 cm model, whose ellipse holds the truth as often as its card says."""
    servers, store = live
    scenes, iq = simulate(spec.network, 1, seed=4343, priors=Priors.nominal("70cm"), signal=signal, n_online=7)
    doc = scene_payloads(scenes, iq, spec.network, signal, seed=4343, request_prefix="uhf")[0]
    assert 430e6 <= doc["center_freq_hz"] <= 440e6
    fix = predict(doc, timeout_s=30)
    assert fix["model"]["name"] == "localization_model_70cm" and fix["quality"]["grade"] in ("good", "fair", "poor")
    rows = store._run(lambda c: c.execute(f"SELECT model_name FROM {store.schema}.predictions WHERE fix_key = %s",
                                          ("uhf-4343-0",)).fetchall())
    assert rows == [("localization_model_70cm",)]
    vhf = predict(scene_payloads(*simulate(spec.network, 1, seed=4344, signal=signal), spec.network, signal,
                                 seed=4344, request_prefix="vhf")[0], timeout_s=30)
    assert vhf["model"]["name"] == "localization_model"


def test_a_redelivered_task_writes_no_second_row(live, live_worker, scenes_and_payloads):
    servers, store = live
    doc = copy.deepcopy(scenes_and_payloads[1][5])
    doc.pop("request_id")  # keyed by task id
    doc["options"] = {"cache": False}
    task_id = f"redelivered-{uuid.uuid4()}"
    first = submit(doc, task_id=task_id).get(timeout=30)
    again = submit(doc, task_id=task_id).get(timeout=30)  # the broker delivering the same task twice
    assert first["position"] == again["position"]
    assert len(_rows(store, "fix_key = %s", task_id)) == 1


def test_cache_hit_returns_the_same_fix_marked_cached(live, live_worker, scenes_and_payloads):
    servers, store = live
    doc = copy.deepcopy(scenes_and_payloads[1][7])
    doc["request_id"] = f"cache-a-{uuid.uuid4()}"
    first = predict(doc, timeout_s=30)
    doc["request_id"] = f"cache-b-{uuid.uuid4()}"
    second = predict(doc, timeout_s=30)
    assert first["cached"] is False and second["cached"] is True
    assert second["position"] == first["position"]
    assert second["uncertainty"] == first["uncertainty"]
    assert second["request_id"] == doc["request_id"]
    assert _rows(store, "fix_key = %s", doc["request_id"])[0][3] is True  # stored, marked cached
    doc["request_id"] = f"cache-c-{uuid.uuid4()}"
    doc["options"] = {"cache": False}
    assert predict(doc, timeout_s=30)["cached"] is False  # a payload can opt out


def test_invalid_payloads_fail_typed_and_are_recorded(live, live_worker, scenes_and_payloads):
    servers, store = live
    good = scenes_and_payloads[1][2]
    bad = [({**good, "request_id": f"bad-{uuid.uuid4()}", "receivers": good["receivers"][:2]}, "too_few_receivers"),
           ({**good, "schema": "nope"}, "unknown_schema"),
           ({**good, "center_freq_hz": 300.0e6}, "unsupported_frequency")]
    for doc, code in bad:
        res = submit(doc)
        with pytest.raises(PayloadError) as info:
            res.get(timeout=30)
        assert info.value.code == code
        assert res.state == "FAILURE"
    codes = store._run(lambda c: [r[0] for r in c.execute(f"SELECT code FROM {store.schema}.rejections").fetchall()])
    for _, code in bad:
        assert code in codes
    # the worker is still healthy afterwards
    assert predict({**good, "request_id": f"after-{uuid.uuid4()}"}, timeout_s=30)["schema"] == "heimdall.fix/v1"


def test_a_batch_of_200_lands_exactly_200_rows(live, live_worker, spec, signal):
    servers, store = live
    scenes, iq = simulate(spec.network, 200, seed=2024, signal=signal)
    docs = scene_payloads(scenes, iq, spec.network, signal, seed=2024, request_prefix=None, binary=True)
    before = store.count_fixes()
    summary = predict_batch(docs, chunk_size=32, timeout_s=120)
    assert summary["schema"] == "heimdall.batch/v1"
    assert (summary["payloads"], summary["fixes"], summary["errors"], summary["chunks"]) == (200, 200, 0, 7)
    assert store.count_fixes() - before == 200


def test_batch_task_reports_invalid_members(live, live_worker, scenes_and_payloads):
    from heimdall_inference.worker.tasks import predict_batch as batch_task

    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][10:16]]
    for d in docs:
        d["request_id"] = f"bt-{uuid.uuid4()}"
    docs[3]["receivers"] = docs[3]["receivers"][:1]
    summary = batch_task.delay(docs, 4).get(timeout=60)
    assert summary["fixes"] == 5 and summary["errors"] == 1
    assert summary["error_details"][0]["index"] == 3 and summary["error_details"][0]["code"] == "too_few_receivers"
    with pytest.raises(PayloadError):
        batch_task.delay([], 4).get(timeout=30)


def test_model_info_task(live, live_worker, spec):
    from heimdall_inference.worker.tasks import model_info

    info = model_info.delay().get(timeout=30)
    assert info["name"] == spec.name and info["version"] == spec.version
    assert info["receivers"] == list(spec.network.ids)


def test_cli_db_init_and_submit(live, live_worker, tmp_path, monkeypatch, capsys):
    import json

    from heimdall_inference.cli import main

    servers, store = live
    monkeypatch.setenv("HEIMDALL_DATABASE_URL", servers.settings.database_url)
    monkeypatch.setenv("HEIMDALL_DB_SCHEMA", servers.schema)
    assert main(["db", "init"]) == 0
    assert json.loads(capsys.readouterr().out)["schema"] == servers.schema
    main(["simulate", "--count", "2", "--seed", "77", "--out", str(tmp_path), "--format", "msgpack"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "heimdall.iq/v1", "captured_at": "2026-11-23T07:00:00Z"}')
    capsys.readouterr()
    files = sorted(tmp_path.glob("scene-*.msgpack"))
    assert main(["submit", *map(str, files), str(bad), "--timeout-s", "30"]) == 2
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x.get("request_id") for x in lines[:2]] == ["sim-77-0", "sim-77-1"]
    assert lines[2]["error"]["code"] == "missing_field"
    assert len(_rows(store, "fix_key = ANY(%s)", ["sim-77-0", "sim-77-1"])) == 2


def test_a_pickled_message_is_refused_and_parked_in_heimdall_dead(live, live_worker):
    """Poison on the wire (pickle) is never executed, never lost: it is dead-lettered."""
    import pickle

    from kombu import Connection, Exchange, Producer

    from heimdall_inference.worker.topology import dead_queue

    servers, _ = live
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((), {}, {}))
    with Connection(servers.settings.broker_url) as conn:
        producer = Producer(conn.channel(), exchange=Exchange("heimdall", type="topic"))
        producer.publish(body, routing_key="heimdall.predict.task", content_type="application/x-python-serialize",
                         content_encoding="binary", headers={"task": "heimdall.predict", "id": task_id, "lang": "py"},
                         delivery_mode=2)
        channel = conn.channel()
        dead_queue()(channel).declare()
        msg, deadline = None, time.monotonic() + 20
        while msg is None and time.monotonic() < deadline:
            msg = channel.basic_get(queue="heimdall.dead", no_ack=False)  # raw: never decode the pickle
            time.sleep(0.2)
        assert msg is not None, "the pickled message was neither dead-lettered nor kept"
        assert msg.properties["application_headers"]["id"] == task_id
        assert msg.properties["content_type"] == "application/x-python-serialize"
        channel.basic_ack(msg.delivery_tag)


def test_a_request_id_reused_for_other_iq_is_a_typed_recorded_conflict(live, live_worker, scenes_and_payloads):
    """It used to return SUCCESS and store nothing; a redelivered or resubmitted copy records it once."""
    _, store = live
    rid = f"reused-{uuid.uuid4()}"
    first = {**copy.deepcopy(scenes_and_payloads[1][20]), "request_id": rid}
    other = {**copy.deepcopy(scenes_and_payloads[1][21]), "request_id": rid, "captured_at": first["captured_at"]}
    stored = predict(first, timeout_s=30)
    assert predict(copy.deepcopy(first), timeout_s=30)["position"] == stored["position"]  # a duplicate: fine
    for _ in range(2):
        with pytest.raises(PayloadError) as err:
            predict(copy.deepcopy(other), timeout_s=30)
        assert err.value.code == "conflict" and err.value.field == "request_id"
    assert len(_rows(store, "fix_key = %s", rid)) == 1
    rows = store._run(lambda c: c.execute(f"SELECT code FROM {store.schema}.rejections WHERE reject_key = %s",
                                          (rid,)).fetchall())
    assert rows == [("conflict",)]
