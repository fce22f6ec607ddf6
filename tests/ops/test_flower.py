"""Flower behind basic auth, on the real broker with a real worker: refused without credentials, the task that
just ran listed with them; its /metrics and /healthcheck are exempt (the stack keeps them on its own network)."""

from __future__ import annotations

import base64
import copy
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ..servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_flower_refuses_without_credentials_and_lists_the_task_that_ran_with_them(tmp_path, scenes_and_payloads):
    pytest.importorskip("flower")
    import json

    from heimdall_inference.client import submit

    from ..live import isolated_worker

    with isolated_worker("flower", tmp_path / "w.log", concurrency=1) as (settings, store, worker):
        port = free_port()
        env = {**os.environ, **settings.to_env(), "FLOWER_BASIC_AUTH": "operator:s3cret-value",
               "PYTHONPATH": str(ROOT)}
        log = open(tmp_path / "flower.log", "wb")
        flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "heimdall_inference.worker", "flower",
                                   f"--port={port}", "--address=127.0.0.1"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        auth = ("operator", "s3cret-value")
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    code, _ = _get(base + "/healthcheck")
                    if code == 200:
                        break
                except OSError:
                    pass
                assert flower.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
                time.sleep(0.5)
            assert _get(base + "/api/workers")[0] == 401
            assert _get(base + "/api/tasks", ("operator", "wrong"))[0] == 401
            assert _get(base + "/", None)[0] == 401  # the dashboard, too
            # Flower switches task events on in the workers it finds; a task after that is listed
            deadline = time.monotonic() + 60
            while True:
                code, body = _get(base + "/api/workers?refresh=1", auth)
                if code == 200 and json.loads(body):
                    break
                assert time.monotonic() < deadline, body
                time.sleep(1)
            listed: dict = {}
            deadline = time.monotonic() + 60
            while not listed and time.monotonic() < deadline:
                result = submit({**copy.deepcopy(scenes_and_payloads[1][0]), "request_id": f"flower-{time.time()}"})
                result.get(timeout=60)
                time.sleep(2)
                code, body = _get(base + "/api/tasks", auth)
                assert code == 200
                listed = {k: v for k, v in json.loads(body).items() if k == result.id}
            assert listed and listed[result.id]["name"] == "heimdall.predict" and listed[result.id]["state"] == "SUCCESS"
            # exempt from auth by Flower's design: scraped by Prometheus on the stack's network only
            assert _get(base + "/metrics")[0] == 200 and _get(base + "/healthcheck")[0] == 200
        finally:
            flower.terminate()
            flower.wait(timeout=30)
            log.close()
