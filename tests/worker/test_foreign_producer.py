"""A producer that is not this package: docs/examples/publish_raw.py publishes the raw AMQP message the
README documents (pika) and reads the result under the prefixed Redis key (redis), against a real worker."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "examples" / "publish_raw.py"


def test_the_example_imports_nothing_of_this_package_or_celery():
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"__future__", "argparse", "json", "sys", "time", "uuid", "pika", "redis"}


def _run(servers, payload: dict, tmp_path: Path) -> tuple[int, dict]:
    path = tmp_path / "payload.json"
    path.write_text(json.dumps(payload))
    s = servers.settings
    res = subprocess.run([sys.executable, str(SCRIPT), str(path), "--amqp", s.broker_url, "--redis", s.result_backend,
                          "--key-prefix", s.redis_key_prefix, "--timeout-s", "30"],
                         capture_output=True, text=True, timeout=90)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


@pytest.mark.integration
def test_a_raw_amqp_publish_gets_its_fix_from_the_prefixed_key_and_a_row(live, live_worker, payload, tmp_path):
    servers, store = live
    assert servers.settings.redis_key_prefix.startswith("heimdall-test-")  # a prefix other than the default
    doc = {**copy.deepcopy(payload), "request_id": "foreign-producer-1"}
    code, fix = _run(servers, doc, tmp_path)
    assert code == 0, fix
    assert fix["schema"] == "heimdall.fix/v1" and fix["request_id"] == "foreign-producer-1"
    assert fix["timings_ms"]["queue"] >= 0  # the optional heimdall_sent_at header was read
    stored = store.fetch_fix("foreign-producer-1")
    assert stored is not None and stored["position"] == fix["position"]


@pytest.mark.integration
def test_a_raw_producer_gets_the_typed_error_for_invalid_input(live, live_worker, payload, tmp_path):
    servers, _ = live
    bad = {**copy.deepcopy(payload), "receivers": payload["receivers"][:2], "request_id": "foreign-producer-bad"}
    code, out = _run(servers, bad, tmp_path)
    assert code == 2
    assert out["error"]["type"] == "PayloadError" and out["error"]["code"] == "too_few_receivers"
    assert out["error"]["field"] == "receivers"
