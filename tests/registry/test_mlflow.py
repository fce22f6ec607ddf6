"""The model lifecycle on the real path: a real ``mlflow server`` (SQLite backend store) with its artifacts in S3
on a ``moto`` server, the CLI registering and promoting, real workers resolving ``models:/…@alias`` on the real
RabbitMQ/Redis/PostgreSQL, falling back to their cached copy, and refusing to consume without a model."""

from __future__ import annotations

import copy
import json
import re
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

from heimdall_inference.cli import main
from heimdall_inference.core.session import default_model_path

from ..live import PG_URL, isolated_worker, wait_for_depths
from ..servers import PrivateMlflow, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

URI = "models:/localization_model@production"


@pytest.fixture(scope="module")
def mlflow():
    server = PrivateMlflow()
    mp = pytest.MonkeyPatch()
    for k, v in server.env.items():
        mp.setenv(k, v)
    try:
        yield server
    finally:
        mp.undo()
        server.close()


def _cli(capsys, *args: str) -> tuple[int, object]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else out.err)


def _registered(capsys, alias: str | None = None) -> dict:
    code, v = _cli(capsys, "model", "register", str(default_model_path()), *(["--alias", alias] if alias else []))
    assert code == 0, v
    return v


def _model_version_column(schema: str, key: str) -> str:
    with psycopg.connect(PG_URL) as conn:
        return conn.execute(f'SELECT model_version FROM "{schema}".predictions WHERE fix_key = %s', (key,)).fetchone()[0]


def test_register_promote_list_and_info_through_the_cli(mlflow, capsys, tmp_path):
    v = _registered(capsys)
    assert v["sha256"] == __import__("hashlib").sha256(default_model_path().read_bytes()).hexdigest()
    assert v["contract"] == "heimdall.model/v1" and v["model_version"] == "2" and v["aliases"] == []
    assert float(v["card"]["model.median_km"]) > 0 and float(v["card"]["model.coverage_0.95"]) > 90
    assert any(k.endswith("model/localization_model.onnx") for k in mlflow.s3_keys())  # artifacts in S3
    assert any(k.endswith("model/MODEL_CARD.md") for k in mlflow.s3_keys())
    code, promoted = _cli(capsys, "model", "promote", v["version"], "--alias", "challenger")
    assert code == 0 and promoted["aliases"] == ["challenger"] and promoted["version"] == v["version"]
    code, info = _cli(capsys, "model", "info", "--uri", "models:/localization_model@challenger")
    assert code == 0 and info["version"] == v["version"]
    code, listed = _cli(capsys, "model", "list")
    assert code == 0 and {x["version"]: x["aliases"] for x in listed}[v["version"]] == ["challenger"]
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    code, err = _cli(capsys, "model", "register", str(broken))
    assert code == 1 and "RegistryError" in err and "is not registered" in err and "Traceback" not in err
    code, err = _cli(capsys, "model", "promote", "999", "--alias", "production")
    assert code == 1 and "RegistryError" in err
    # a deployment's first start registers the shipped model and makes it production; later starts change nothing
    code, first = _cli(capsys, "model", "bootstrap", "--name", "bootstrapped", "--alias", "production")
    code2, again = _cli(capsys, "model", "bootstrap", "--name", "bootstrapped", "--alias", "production")
    assert (code, code2) == (0, 0) and first["registered"] and not again["registered"]
    assert first["version"] == again["version"] == "1" and again["aliases"] == ["production"]


def test_a_worker_serves_the_alias_and_falls_back_to_its_cached_copy(mlflow, capsys, tmp_path, scenes_and_payloads):
    v = _registered(capsys, alias="production")
    cache = tmp_path / "models"
    doc = {**copy.deepcopy(scenes_and_payloads[1][0]), "request_id": "registry-1"}
    t0 = time.monotonic()
    with isolated_worker("mlflow", tmp_path / "w.log", concurrency=1, model_uri=URI,
                         model_cache_dir=str(cache)) as (settings, store, worker):
        ready_s = time.monotonic() - t0
        from heimdall_inference.client import predict
        from heimdall_inference.worker.tasks import model_info

        fix = predict(doc, timeout_s=30)
        assert fix["model"] == {"name": "localization_model", "version": v["version"], "alias": "production"}
        assert _model_version_column(settings.db_schema, "registry-1") == v["version"]
        asked = predict({**doc, "request_id": "registry-asked", "options": {"model": "production"}}, timeout_s=30)
        assert asked["model"]["version"] == v["version"]
        from heimdall_inference.errors import PayloadError

        with pytest.raises(PayloadError) as err:  # a model this worker does not serve: a typed error, recorded
            predict({**doc, "request_id": "registry-other", "options": {"model": "challenger"}}, timeout_s=30)
        assert err.value.code == "unknown_model" and store.count_rejections() == 1
        info = model_info.delay().get(timeout=30)
        assert (info["version"], info["alias"], info["sha256"]) == (v["version"], "production", v["sha256"])
        assert [p.name for p in cache.glob("localization_model/*-*")] == [f"{v['version']}-{v['sha256'][:16]}"]
        worker.stop()

        # the registry does not answer: the next worker serves what the alias pointed at, from the cache
        from heimdall_inference.worker.process import WorkerProcess

        port = free_port()
        again = WorkerProcess(settings.replace(metrics_port=port), tmp_path / "w2.log", concurrency=1,
                              extra_env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
        try:
            again.wait_ready()
            fix = predict({**doc, "request_id": "registry-2"}, timeout_s=30)
            assert fix["model"]["version"] == v["version"]
            log = again.log_path.read_text()
            assert "the model registry did not answer" in log and f"serving the cached version {v['version']}" in log
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            assert "heimdall_model_registry_fallbacks_total 1.0" in metrics
            served = [dict(re.findall(r'(\w+)="([^"]*)"', labels)) for labels, value in
                      re.findall(r"^heimdall_model_info\{([^}]*)\} (\S+)$", metrics, re.M) if float(value) == 1.0]
            assert sorted(({k: d[k] for k in ("name", "version", "alias", "source")} for d in served),
                          key=lambda d: d["name"]) == [
                {"name": "localization_model", "version": v["version"], "alias": "production", "source": "cache"},
                {"name": "localization_model_70cm", "version": "1", "alias": "", "source": "shipped"}]  # its band's
        finally:
            again.stop()
    print(f"worker ready from the registry (first download) in {ready_s:.1f} s")


def test_a_worker_with_no_acceptable_model_consumes_nothing(mlflow, capsys, tmp_path, scenes_and_payloads):
    from mlflow import MlflowClient

    from heimdall_inference.client import submit
    from heimdall_inference.worker.process import WorkerProcess

    v = _registered(capsys, alias="production")
    bad = _registered(capsys)
    MlflowClient().set_model_version_tag("localization_model", bad["version"], "sha256", "0" * 64)
    MlflowClient().set_registered_model_alias("localization_model", "broken", bad["version"])
    with isolated_worker("nomodel", tmp_path / "w.log", concurrency=1, model_uri=URI,
                         model_cache_dir=str(tmp_path / "m1")) as (settings, store, worker):
        worker.stop()
        pending = submit({**copy.deepcopy(scenes_and_payloads[1][1]), "request_id": "waits"})
        refused = WorkerProcess(settings.replace(model_uri="models:/localization_model@broken",
                                                 model_cache_dir=str(tmp_path / "m2")), tmp_path / "w2.log",
                                concurrency=1)
        with pytest.raises(RuntimeError, match="worker exited"):
            refused.wait_ready(timeout_s=120)
        refused.stop()
        log = refused.log_path.read_text()
        assert "no model to serve" in log and "sha256" in log and " ready." not in log
        assert "] received" not in log  # it took nothing off the queue (Celery logs "Task name[id] received")
        vhost = settings.broker_url.rsplit("/", 1)[1]
        assert wait_for_depths(vhost, {settings.queue: 1}) == {settings.queue: 1}  # the task still waits there
        assert not any((tmp_path / "m2").rglob("*.onnx"))  # nothing unverified was kept
        served = WorkerProcess(settings, tmp_path / "w3.log", concurrency=1)  # a good worker takes it
        try:
            served.wait_ready()
            assert pending.get(timeout=60)["model"]["version"] == v["version"]
        finally:
            served.stop()


def test_an_alias_moved_under_load_is_swapped_in_with_no_task_failed_or_lost(mlflow, capsys, tmp_path,
                                                                          scenes_and_payloads):
    """A continuous stream of tasks; the alias moves (picked up by polling), then moves to a version with a
    wrong checksum (refused on `model reload`: the old one keeps serving). Every task gets its fix, each fix
    names the version that computed it, and the versions only move forward."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from mlflow import MlflowClient

    from heimdall_inference.client import submit

    from ..faults.accounting import assert_each_stored_once
    from ..live import report_line

    first = _registered(capsys, alias="production")
    with isolated_worker("swap", tmp_path / "w.log", concurrency=2, model_uri=URI, model_poll_s=1.0,
                         model_cache_dir=str(tmp_path / "models")) as (settings, store, worker):
        out: list[tuple[float, float, str]] = []
        errors: list[BaseException] = []
        sent: list[str] = []
        pool = ThreadPoolExecutor(max_workers=64)
        docs = scenes_and_payloads[1]

        def wait(res, t0: float) -> None:
            try:
                fix = res.get(timeout=60)
                out.append((t0, time.monotonic() - t0, fix["model"]["version"]))
            except BaseException as exc:  # counted: the test requires none
                errors.append(exc)

        def send(n: int) -> None:
            for _ in range(n):
                d = {**copy.deepcopy(docs[len(sent) % len(docs)]), "request_id": f"swap-{len(sent)}"}
                t0 = time.monotonic()
                pool.submit(wait, submit(d), t0)
                sent.append(d["request_id"])
                time.sleep(1 / 40)

        send(80)  # ~2 s on the first version
        t_swap = time.monotonic()
        second = _registered(capsys, alias="production")  # the poll (1 s) picks it up
        deadline = time.monotonic() + 60
        while not any(v == second["version"] for _, _, v in out) and time.monotonic() < deadline:
            send(20)
        t_swapped = time.monotonic()
        send(80)
        bad = _registered(capsys)
        MlflowClient().set_model_version_tag("localization_model", bad["version"], "sha256", "f" * 64)
        MlflowClient().set_registered_model_alias("localization_model", "production", bad["version"])
        code, replies = _cli(capsys, "model", "reload")
        assert code == 0 and all(r["ok"] for r in replies.values()), replies
        send(120)
        pool.shutdown(wait=True)
        assert errors == [], errors[:3]
        figures = assert_each_stored_once(store, sent)
        assert len(out) == len(sent)
        versions = [v for _, _, v in sorted(out)]
        assert set(versions) == {first["version"], second["version"]}  # the broken one never served
        assert {v for t, _, v in out if t >= t_swapped + 1.0} == {second["version"]}  # nothing old after the swap
        log = worker.log_path.read_text()
        assert "is refused" in log and "sha256" in log and f"now points at version {second['version']}" in log
        assert 1 <= log.count("model swap: now serving") <= 2  # each child that ran a pass since, once
        lat = {k: [d * 1e3 for t, d, _ in out if sel(t)] for k, sel in
               {"before": lambda t: t < t_swap, "during": lambda t: t_swap <= t < t_swapped + 1.0,
                "after": lambda t: t >= t_swapped + 1.0}.items()}
        p99 = {k: round(float(np.percentile(v, 99)), 1) for k, v in lat.items() if v}
        report_line(f"model hot swap under ~40 tasks/s: {figures}, failed 0, versions {first['version']} -> "
                    f"{second['version']} (a broken version refused), p99 ms {p99}, swap picked up "
                    f"{t_swapped - t_swap:.1f} s after the alias moved")


def test_a_worker_reads_an_s3_artifact_source_directly(mlflow, tmp_path):
    """A tracking server without the artifact proxy hands out s3:// sources: the worker's reader takes the one
    .onnx under the prefix from S3 itself (MLFLOW_S3_ENDPOINT_URL), and refuses a prefix holding two."""
    import boto3

    from heimdall_inference.errors import RegistryError
    from heimdall_inference.registry.rest import _download_s3
    from heimdall_inference.registry.version import RegisteredVersion

    s3 = boto3.client("s3", endpoint_url=mlflow.s3_url, region_name="us-east-1")
    s3.put_object(Bucket=mlflow.BUCKET, Key="direct/run/model/localization_model.onnx",
                  Body=default_model_path().read_bytes())
    v = RegisteredVersion(name="localization_model", version="9", sha256="0" * 64)
    got = _download_s3(f"s3://{mlflow.BUCKET}/direct/run/model", tmp_path / "a", v)
    assert got.read_bytes() == default_model_path().read_bytes()
    s3.put_object(Bucket=mlflow.BUCKET, Key="direct/run/model/other.onnx", Body=b"x")
    with pytest.raises(RegistryError, match="2 .onnx files"):
        _download_s3(f"s3://{mlflow.BUCKET}/direct/run/model", tmp_path / "b", v)


def test_the_swap_benchmark_flips_the_alias_twice_and_loses_nothing(mlflow, tmp_path):
    """bench --swap on the real servers and registry, with short phases: its accounting, not its timings (4 s phases:
    a swap, download and check included, is picked up within ~1-3 s here)."""
    from heimdall_inference.bench.swap import format_swap_report, run_swap_bench

    from ..live import drop_live, make_live, report_line

    servers = make_live("bswap")
    try:
        r = run_swap_bench(servers.settings, workers=2, phase_s=4.0, log_dir=tmp_path, progress=lambda m: None)
    finally:
        from heimdall_inference.settings import Settings
        from heimdall_inference.worker.celery_app import configure_app

        configure_app(Settings.from_env())
        drop_live(servers)
    assert r["failed"] == 0 and r["lost"] == 0 and r["fixes"] == r["sent"] > 0, r
    a, b, _ = r["versions"]
    assert set(r["served_by_version"]) <= {a, b}, r
    log = Path(r["worker_log"]).read_text()
    assert f"now points at version {b} (was {a})" in log and f"now points at version {a} (was {b})" in log
    assert r["p99_before_ms"] > 0 and r["p99_during_ms"] > 0
    report_line("bench --swap (4 s phases): " + format_swap_report(r).replace("\n", "; "))


def test_ab_split_shadow_and_allow_list_through_a_real_worker(mlflow, capsys, tmp_path, scenes_and_payloads):
    """production (the shipped model) and challenger (a copy whose fixes lie 2 km further east) in the registry; a
    worker splits 80/20 by session_id, runs the challenger in shadow, and admits options.model=challenger. 2,000
    tasks in 500 sessions of 4: the split lands within binomial tolerance and is exactly the sessions' hash draw,
    every session is sticky, every fix production served has the challenger's fix stored beside it (2 km east), the
    report command reads both; then the challenger alias moves and one reload swaps that arm alone."""
    from concurrent.futures import ThreadPoolExecutor

    from heimdall_inference.client import submit
    from heimdall_inference.errors import PayloadError
    from heimdall_inference.worker.routing import draw

    from ..faults.accounting import assert_each_stored_once
    from ..live import report_line
    from ..models import shifted_model

    prod = _registered(capsys, alias="production")
    code, chal = _cli(capsys, "model", "register", str(shifted_model(tmp_path / "east2km.onnx")), "--alias",
                      "challenger")
    assert code == 0, chal
    port = free_port()
    with isolated_worker("ab", tmp_path / "w.log", concurrency=2, model_uri=URI, model_poll_s=0,
                         model_split="production=80,challenger=20", model_shadow="challenger",
                         model_allow="challenger", model_cache_dir=str(tmp_path / "models"),
                         metrics_port=port) as (settings, store, worker):
        docs = scenes_and_payloads[1]
        sent = [{**copy.deepcopy(docs[i % len(docs)]), "request_id": f"ab-{i}", "session_id": f"session-{i // 4}"}
                for i in range(2000)]
        with ThreadPoolExecutor(max_workers=32) as pool:
            fixes = list(pool.map(lambda d: submit(d).get(timeout=120), sent))
        assert_each_stored_once(store, [d["request_id"] for d in sent])
        arm = {}
        for d, f in zip(sent, fixes):
            assert arm.setdefault(d["session_id"], f["model"]["alias"]) == f["model"]["alias"]  # sticky
            assert f["model"]["version"] == {"production": prod["version"], "challenger": chal["version"]}[
                f["model"]["alias"]]
        challenged = {s for s, a in arm.items() if a == "challenger"}
        assert abs(len(challenged) - 100) <= 4 * (500 * 0.2 * 0.8) ** 0.5, len(challenged)  # binomial, 4 sigma
        assert challenged == {s for s in arm if draw(s) >= 0.8}  # the stable hash, on every worker child

        with psycopg.connect(PG_URL) as conn:
            shadows = dict(conn.execute(f'SELECT fix_key, model_version FROM "{settings.db_schema}".shadow_fixes')
                           .fetchall())
        served_by_prod = {d["request_id"] for d, f in zip(sent, fixes) if f["model"]["alias"] == "production"}
        assert set(shadows) == served_by_prod and set(shadows.values()) == {chal["version"]}

        asked = submit({**copy.deepcopy(docs[0]), "request_id": "ab-asked", "session_id": next(
            s for s in arm if s not in challenged), "options": {"model": "challenger"}}).get(timeout=60)
        assert asked["model"]["alias"] == "challenger"
        with pytest.raises(PayloadError) as err:
            submit({**copy.deepcopy(docs[0]), "request_id": "ab-pinned", "options": {"model": prod["version"] + "9"}}
                   ).get(timeout=60)
        assert err.value.code == "unknown_model"

        code, report = _cli(capsys, "model", "compare", "--since-hours", "0")
        assert code == 0, report
        shares = {a["alias"]: a["share"] for a in report["arms"]}
        assert abs(shares["challenger"] - len(challenged) / 500) < 0.01
        (cmp,) = report["shadow"]
        assert cmp["served"]["version"] == prod["version"] and cmp["shadow"]["version"] == chal["version"]
        assert cmp["fixes"] == len(served_by_prod) and cmp["distance_m"]["median"] == pytest.approx(2000.0, abs=1.0)
        assert cmp["shadow_inside_served_95"] > 0.95

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        shadowed = sum(float(v) for labels, v in re.findall(r"^heimdall_fixes_total\{([^}]*)\} (\S+)$", metrics, re.M)
                       if 'role="shadow"' in labels and f'model_version="{chal["version"]}"' in labels)
        assert shadowed == len(served_by_prod)

        # the challenger alias moves (4 km east now): one reload, and that arm alone swaps
        code, third = _cli(capsys, "model", "register", str(shifted_model(tmp_path / "east4km.onnx", east_m=4000.0,
                                                                          version="3")), "--alias", "challenger")
        assert code == 0, third
        code, replies = _cli(capsys, "model", "reload")
        assert code == 0 and all(r["ok"] for r in replies.values()), replies
        deadline = time.monotonic() + 60
        s = sorted(challenged)[0]
        while time.monotonic() < deadline:
            f = submit({**copy.deepcopy(docs[1]), "request_id": f"ab-after-{time.monotonic()}", "session_id": s}
                       ).get(timeout=60)
            if f["model"]["version"] == third["version"]:
                break
            time.sleep(0.2)
        assert f["model"] == {"name": "localization_model", "version": third["version"], "alias": "challenger"}
        p = submit({**copy.deepcopy(docs[1]), "request_id": "ab-after-prod", "session_id": next(
            x for x in arm if x not in challenged)}).get(timeout=60)
        assert p["model"]["version"] == prod["version"]  # production did not move
        log = worker.log_path.read_text()
        assert f"challenger at {third['version']}" in log
    report_line(f"A/B 80/20 over 2,000 tasks in 500 sessions: {len(challenged)} sessions on the challenger; "
                f"{len(served_by_prod)} shadow rows, median {cmp['distance_m']['median']} m from the served fix")


def test_both_bands_from_the_registry_and_the_70cm_alias_swapped_alone(mlflow, capsys, tmp_path, spec, signal,
                                                                       scenes_and_payloads):
    """`model bootstrap` registers both shipped models, each under its own name, as production; a worker serving
    models:/localization_model@production with HEIMDALL_BAND_MODELS=models:/localization_model_70cm@production answers
    a 70 cm payload with the 70 cm model's registered version; the 70 cm alias moves and one reload swaps that model
    alone."""
    from heimdall_inference.client import predict
    from heimdall_inference.core.session import shipped_model_path
    from heimdall_inference.lab.simulator import Priors, scene_payloads, simulate
    from heimdall_inference.worker.tasks import model_info

    code, boot = _cli(capsys, "model", "bootstrap", "--alias", "production")
    assert code == 0 and [b["name"] for b in boot] == ["localization_model", "localization_model_70cm"], boot
    uhf = next(b for b in boot if b["name"] == "localization_model_70cm")
    assert uhf["aliases"] == ["production"] and uhf["sha256"] == __import__("hashlib").sha256(
        shipped_model_path("70cm").read_bytes()).hexdigest()
    assert any(k.endswith("model/MODEL_CARD_70cm.md") for k in mlflow.s3_keys())
    assert any(k.endswith("model/reliability_70cm.png") for k in mlflow.s3_keys())
    scenes, iq = simulate(spec.network, 2, seed=4545, priors=Priors.nominal("70cm"), signal=signal)
    docs = scene_payloads(scenes, iq, spec.network, signal, seed=4545, request_prefix="reg70")
    with isolated_worker("bands", tmp_path / "w.log", concurrency=1, model_uri=URI, model_poll_s=0,
                         band_models="models:/localization_model_70cm@production",
                         model_cache_dir=str(tmp_path / "models")) as (settings, store, worker):
        fix = predict(copy.deepcopy(docs[0]), timeout_s=30)
        assert fix["model"] == {"name": "localization_model_70cm", "version": uhf["version"], "alias": "production"}
        info = model_info.delay().get(timeout=30)
        assert [(b["name"], b["version"], b["source"]) for b in info["bands"]] == [
            ("localization_model_70cm", uhf["version"], "registry")]
        vhf = predict({**copy.deepcopy(scenes_and_payloads[1][0]), "request_id": "reg-2m"}, timeout_s=30)
        assert vhf["model"]["name"] == "localization_model"
        code, again = _cli(capsys, "model", "register", str(shipped_model_path("70cm")), "--name",
                           "localization_model_70cm", "--alias", "production")
        assert code == 0 and again["version"] != uhf["version"]
        code, replies = _cli(capsys, "model", "reload")
        assert code == 0 and all(r["ok"] for r in replies.values()), replies
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fix = predict({**copy.deepcopy(docs[1]), "request_id": f"reg70-after-{time.monotonic()}"}, timeout_s=30)
            if fix["model"]["version"] == again["version"]:
                break
            time.sleep(0.2)
        assert fix["model"] == {"name": "localization_model_70cm", "version": again["version"], "alias": "production"}
        assert predict({**copy.deepcopy(scenes_and_payloads[1][1]), "request_id": "reg-2m-after"},
                       timeout_s=30)["model"] == vhf["model"]  # the 2 m model did not move
        assert f"models:/localization_model_70cm@production at {again['version']}" in worker.log_path.read_text()
