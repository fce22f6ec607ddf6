"""The worker's log lines: a fix is one short summary on Celery's success line, and JSON lines on request."""

from __future__ import annotations

import copy
import json

import pytest


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_real_workers_success_lines_summarise_the_fix(tmp_path, scenes_and_payloads, fmt):
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    with isolated_worker(f"logs{fmt}", tmp_path / "w.log", concurrency=1, log_format=fmt) as (_, _store, worker):
        fixes = [submit({**copy.deepcopy(d), "request_id": f"log-{i}"}).get(timeout=60)
                 for i, d in enumerate(scenes_and_payloads[1][:3])]
        worker.stop()
        text = worker.log_path.read_text()
    assert "geojson" not in text and "covariance_enu_m2" not in text  # never the whole document
    if fmt == "text":
        for f in fixes:
            assert f"succeeded in" in text and f"fix request_id={f['request_id']} lat={f['position']['lat']}" in text
        return
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    done = [d for d in lines if "succeeded in" in d["message"]]
    assert len(done) == 3, text[-3000:]
    for d, f in zip(sorted(done, key=lambda d: d["request_id"]), fixes):
        assert (d["task_id"], d["task_name"], d["request_id"], d["model_version"]) == (
            f["task_id"], "heimdall.predict", f["request_id"], "2")
        assert d["level"] == "INFO" and d["logger"] == "celery.app.trace" and d["ts"].endswith("+00:00")
    assert any(d["message"].startswith("broker: amqp://") for d in lines)  # the worker's own lines too
