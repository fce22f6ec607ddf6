"""The Grafana board and the alert rules, proven: promtool checks and unit-tests every rule, and a real Prometheus
scraping a real worker under load answers every panel's query with data and evaluates every rule without error;
a dead letter puts its alert in motion."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from ..live import report_line
from ..servers import free_port, unavailable

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
BOARD = ROOT / "deploy" / "grafana" / "dashboards" / "heimdall.json"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        unavailable("promtool (Debian's prometheus package)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def _panel_queries() -> list[tuple[str, str]]:
    board = json.loads(BOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def test_the_rules_and_the_config_pass_promtool_and_every_alert_has_a_unit_test():
    res = _promtool("check", "rules", str(PROM / "alerts.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    res = _promtool("check", "config", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run(["promtool", "test", "rules", "alerts.test.yml"], cwd=PROM, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
              for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert alerts == tested  # each alert is shown firing by a unit test


def test_the_board_is_provisioned_against_the_provisioned_datasource():
    import yaml

    board = json.loads(BOARD.read_text())
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"]
    uids = {d["uid"] for d in ds}
    assert board["uid"] == "heimdall-inference" and len(board["panels"]) >= 12
    for p in board["panels"]:
        assert p["datasource"]["uid"] in uids and p["description"] and p["targets"], p["title"]
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for needed in ("model version", "latency", "stage", "rejections", "cache hit", "batch", "queue", "dead", "workers"):
        assert needed in titles


@pytest.mark.integration
@pytest.mark.slow
def test_a_real_prometheus_scraping_a_real_worker_answers_every_panel_and_evaluates_every_rule(
        tmp_path, scenes_and_payloads):
    from kombu import Connection, Producer

    from heimdall_inference.client import submit
    from heimdall_inference.errors import PayloadError
    from heimdall_inference.worker.topology import DEAD_LETTER_EXCHANGE

    from ..live import isolated_worker

    if shutil.which("prometheus") is None:
        unavailable("prometheus (Debian's prometheus package)")
    port = free_port()
    with isolated_worker("prom", tmp_path / "w.log", concurrency=2, metrics_port=port) as (settings, store, worker):
        prom_port = free_port()
        data = Path(tempfile.mkdtemp(prefix="heimdall-prom-"))
        (data / "prometheus.yml").write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(PROM / "alerts.yml")],
            "scrape_configs": [{"job_name": "heimdall-worker", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }))
        log = open(data / "prometheus.log", "wb")
        prom = subprocess.Popen(["prometheus", f"--config.file={data / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={data / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def get(path: str, **query: str) -> dict:
            url = f"{api}/{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())

        try:
            docs = scenes_and_payloads[1]
            for round_ in range(6):  # load over several scrapes: fixes, a cache hit, a rejection each round
                results = [submit({**copy.deepcopy(docs[i % len(docs)]), "request_id": f"p{round_}-{i}"})
                           for i in range(20)]
                results.append(submit({**copy.deepcopy(docs[0]), "request_id": f"again-{round_}"}))
                for r in results:
                    r.get(timeout=60)
                with pytest.raises(PayloadError):
                    submit({**copy.deepcopy(docs[1]), "receivers": docs[1]["receivers"][:2],
                            "request_id": f"bad-{round_}"}).get(timeout=60)
                time.sleep(1.5)
            with Connection(settings.broker_url) as conn:
                Producer(conn.default_channel).publish({"dead": 1}, exchange=DEAD_LETTER_EXCHANGE, routing_key="x")
            answers = {}
            for title, expr in _panel_queries():
                q = expr.replace("$__rate_interval", "20s")
                got = get("query", query=q)
                assert got["status"] == "success", (title, q, got)
                answers[q] = got["data"]["result"]
            empty = [q for q, res in answers.items() if not res]
            assert empty == [], empty  # every panel's query returns data (a typo returns none)
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                rules = [r for g in get("rules")["data"]["groups"] for r in g["rules"]]
                dead = next(r for r in rules if r["name"] == "HeimdallDeadLetters")
                if dead["state"] in ("pending", "firing"):
                    break
                time.sleep(1)
            assert len(rules) == 9 and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                                                 for r in rules]
            assert dead["state"] in ("pending", "firing")  # the dead letter put its alert in motion
            quiet = {r["name"]: r["state"] for r in rules if r["name"] in ("HeimdallWorkersDown", "HeimdallBrokerUnreachable",
                                                                            "HeimdallLatencyHigh")}
            assert set(quiet.values()) == {"inactive"}, quiet
            p95 = get("query", query="histogram_quantile(0.95, sum by (le) (rate(heimdall_fix_latency_seconds_bucket[30s])))")
            report_line(f"a real Prometheus over a real worker: {len(answers)} panel queries all with data, 9 rules "
                        f"healthy, p95 of a fix {float(p95['data']['result'][0]['value'][1]) * 1e3:.1f} ms")
        finally:
            os.killpg(prom.pid, 15)
            prom.wait(timeout=30)
            log.close()
            shutil.rmtree(data, ignore_errors=True)
