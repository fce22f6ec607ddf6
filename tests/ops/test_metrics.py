"""Prometheus metrics: what a child records, the exporter, and a real worker's /metrics and /healthz."""

from __future__ import annotations

import copy
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from heimdall_inference.errors import PayloadError, TransientError
from heimdall_inference.ops.metrics import ServiceMetrics
from heimdall_inference.worker.service import Request, Service
from heimdall_inference.store import MemoryStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_the_service_records_fixes_rejections_stages_and_batches(localizer, scenes_and_payloads):
    reg = CollectorRegistry()
    svc = Service(localizer, MemoryStore(), metrics=ServiceMetrics(reg))
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:5]]
    bad = {**docs[0], "receivers": docs[0]["receivers"][:2]}
    out = svc.predict_requests([Request(d, f"t{i}") for i, d in enumerate(docs + [bad])])
    assert isinstance(out[-1], PayloadError)
    v = reg.get_sample_value
    assert v("heimdall_fixes_total", {"model": "localization_model", "model_version": "2", "role": "served", "cached": "false"}) == 5
    assert v("heimdall_rejections_total", {"code": "too_few_receivers"}) == 1
    assert v("heimdall_batch_size_count") == 1 and v("heimdall_batch_size_sum") == 6
    assert v("heimdall_stage_seconds_count", {"stage": "inference"}) == 5
    assert 0 < v("heimdall_stage_seconds_sum", {"stage": "features"}) < 5
    svc.metrics.cache_lookups(3, 1)
    assert (v("heimdall_cache_requests_total", {"result": "hit"}), v("heimdall_cache_requests_total", {"result": "miss"})) == (3, 1)


def test_store_outages_are_counted(localizer, scenes_and_payloads):
    class Down(MemoryStore):
        def write_fixes(self, rows):
            raise TransientError("PostgreSQL unreachable")

    reg = CollectorRegistry()
    svc = Service(localizer, Down(), metrics=ServiceMetrics(reg))
    with pytest.raises(TransientError):
        svc.predict(scenes_and_payloads[1][0], task_id="t")
    assert reg.get_sample_value("heimdall_store_errors_total") == 1


@pytest.mark.integration
def test_a_worker_exports_its_childrens_metrics_and_health(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    port = _free_port()
    with isolated_worker("metrics", tmp_path / "w.log", concurrency=2, metrics_port=port) as (settings, store, _worker):
        docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:6]]
        repeat = {**copy.deepcopy(docs[0]), "request_id": "again"}  # same IQ: a cache hit
        bad = {**copy.deepcopy(docs[1]), "receivers": docs[1]["receivers"][:2], "request_id": "bad"}
        for d in docs:
            submit(d).get(timeout=60)
        assert submit(repeat).get(timeout=60)["cached"] is True
        with pytest.raises(PayloadError):
            submit(bad).get(timeout=60)
        code, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200
        m = _samples(text)
        served = (("model", "localization_model"), ("model_version", "2"), ("role", "served"))
        assert m[("heimdall_fixes_total", (("cached", "false"), *served))] == 6
        assert m[("heimdall_fixes_total", (("cached", "true"), *served))] == 1
        assert m[("heimdall_rejections_total", (("code", "too_few_receivers"),))] == 1
        assert m[("heimdall_cache_requests_total", (("result", "hit"),))] == 1
        assert m[("heimdall_batch_size_count", ())] >= 1
        assert m[("heimdall_stage_seconds_count", (("stage", "inference"),))] == 6
        # every served fix has a quality grade: counted, and stored in its row
        assert sum(v for (name, _), v in m.items() if name == "heimdall_fix_quality_total") == 7
        grades = store._run(lambda c: c.execute(f"SELECT quality_grade FROM {store.schema}.predictions").fetchall())
        assert len(grades) == 7 and {g for (g,) in grades} <= {"good", "fair", "poor"}
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        health = json.loads(body)
        assert code == 200 and health["status"] == "ok" and health["children"] == 2 and health["broker_connected"]
        code, body = _get(f"http://127.0.0.1:{port}/readyz")
        ready = json.loads(body)
        assert code == 200 and ready["status"] == "ready" and ready["children_without_model"] == 0, ready
        assert ready["models"] == [{"version": "2", "alias": None, "bands": {"localization_model_70cm": "1"}}] and ready["database"] == "ok"
        assert store.count_fixes() == 7
        # the main process' own figures: the broker's queues (the dead-letter queue holds what we put there)
        assert m[("heimdall_broker_up", ())] == 1 and m[("heimdall_worker_children", ())] == 2
        assert m[("celery_active_consumer_count", (("queue_name", "heimdall.predict"),))] == 1
        assert m[("celery_active_consumer_count", (("queue_name", "heimdall.dead"),))] == 0
        assert ("heimdall_tasks_in_flight", ()) in m
        from kombu import Connection, Producer

        from heimdall_inference.worker.topology import DEAD_LETTER_EXCHANGE

        with Connection(settings.broker_url) as conn:
            for i in range(3):
                Producer(conn.default_channel).publish({"dead": i}, exchange=DEAD_LETTER_EXCHANGE, routing_key="x")
        deadline = time.monotonic() + 30  # RabbitMQ refreshes a quorum queue's count every few seconds
        while time.monotonic() < deadline:
            m = _samples(_get(f"http://127.0.0.1:{port}/metrics")[1])
            if m[("celery_queue_length", (("queue_name", "heimdall.dead"),))] == 3:
                break
            time.sleep(1)
        assert m[("celery_queue_length", (("queue_name", "heimdall.dead"),))] == 3
        assert m[("celery_queue_length", (("queue_name", "heimdall.predict"),))] == 0


@pytest.mark.integration
def test_a_worker_whose_database_does_not_answer_is_alive_but_not_ready(tmp_path):
    """Liveness ignores the database (restarting workers cures no outage); readiness says why it is not ready."""
    from ..live import PG_URL, isolated_worker

    port = _free_port()
    down = f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"
    with isolated_worker("unready", tmp_path / "w.log", concurrency=1, metrics_port=port, store_url=PG_URL,
                         database_url=down) as (_, _store, _worker):
        code, body = _get(f"http://127.0.0.1:{port}/readyz")
        ready = json.loads(body)
        assert code == 503 and ready["status"] == "unready" and ready["database"].startswith("PostgreSQL:"), ready
        assert ready["children_without_model"] == 0 and ready["broker_connected"]
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"


@pytest.mark.integration
def test_a_solo_pool_worker_keeps_its_exporter_and_records_metrics(tmp_path, scenes_and_payloads):
    """The solo pool builds its service in the main process, beside the exporter: both must live."""
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    port = _free_port()
    with isolated_worker("solo", tmp_path / "w.log", pool="solo", metrics_port=port) as (_, store, _worker):
        for d in scenes_and_payloads[1][:2]:
            submit(copy.deepcopy(d)).get(timeout=60)
        code, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert code == 200 and json.loads(body)["children"] == 1
        code, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200 and _samples(text)[("heimdall_fixes_total", (("cached", "false"), ("model", "localization_model"),
                                                                                  ("model_version", "2"), ("role", "served")))] == 2
        assert store.count_fixes() == 2


def test_children_write_their_metrics_even_when_prometheus_client_was_imported_first(tmp_path):
    """Flower's `celery flower` plugin imports prometheus_client whenever the `celery` command starts, before the
    worker sets up its multiprocess folder: the children's metrics then went to memory no exporter reads, and
    /metrics was empty on any image with Flower installed."""
    import subprocess
    import sys

    probe = ("import os, prometheus_client\n"
             "from heimdall_inference.ops.metrics import ServiceMetrics, prepare_multiprocess_dir\n"
             "d = prepare_multiprocess_dir()\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    ServiceMetrics(registry=None).rejections.labels(code='x').inc(3)\n"
             "    os._exit(0)\n"
             "os.waitpid(pid, 0)\n"
             "from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
             "r = CollectorRegistry(); multiprocess.MultiProcessCollector(r, path=str(d))\n"
             "print(generate_latest(r).decode())\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "TMPDIR": str(tmp_path)}, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert 'heimdall_rejections_total{code="x"} 3.0' in out


def test_the_model_gauge_of_a_dead_child_is_forgotten(tmp_path):
    """heimdall_model_info is a live gauge: a recycled child's file kept its old version at 1 for ever."""
    import os
    import subprocess
    import sys

    probe = ("import os\n"
             "from heimdall_inference.ops.metrics import ServiceMetrics, forget_dead_processes, prepare_multiprocess_dir\n"
             "d = prepare_multiprocess_dir()\n"
             "pid = os.fork()\n"
             "if pid == 0:\n"
             "    ServiceMetrics(registry=None).model_loaded('m', '1', 'production', 'registry')\n"
             "    os._exit(0)\n"
             "os.waitpid(pid, 0)\n"
             "from prometheus_client import CollectorRegistry, generate_latest, multiprocess\n"
             "def text():\n"
             "    r = CollectorRegistry(); multiprocess.MultiProcessCollector(r, path=str(d))\n"
             "    return generate_latest(r).decode()\n"
             "print('before', 'heimdall_model_info{' in text())\n"
             "forget_dead_processes(d, {os.getpid()})\n"
             "print('after', 'heimdall_model_info{' in text())\n")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "TMPDIR": str(tmp_path)}, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    assert out == ["before", "True", "after", "False"]
