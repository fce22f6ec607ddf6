"""deploy/kubernetes/: every core object valid against the Kubernetes schemas (kubernetes-validate, strict, offline),
the KEDA objects checked field by field (their CRD schema is not shipped offline), and the pieces agreeing with
each other and with the worker's settings."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.30.0"
SECRET_KEYS = {"broker-url", "result-backend-url", "cache-url", "database-url", "s3-access-key-id",
               "s3-secret-access-key"}


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    import yaml

    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_every_core_object_is_valid_against_the_kubernetes_schemas(objects):
    kv = pytest.importorskip("kubernetes_validate")
    core = {k: d for k, d in objects.items() if not d["apiVersion"].startswith("keda.sh/")}
    assert {k for k, _ in core} == {"Deployment", "PodDisruptionBudget", "ConfigMap", "Job"}
    for key, doc in core.items():
        kv.validate(doc, VERSION, strict=True)  # raises ValidationError naming the field
    broken = {**objects[("Deployment", "heimdall-worker")], "spec": {"replicas": "two"}}
    with pytest.raises(kv.ValidationError):  # the validator really validates
        kv.validate(broken, VERSION, strict=True)


def test_the_worker_deployment_probes_shuts_down_and_reads_its_settings(objects):
    from heimdall_inference.settings import Settings

    dep = objects[("Deployment", "heimdall-worker")]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"] == "2"
    assert "--concurrency" in c["args"] and c["args"][c["args"].index("--concurrency") + 1] == "2"
    config = objects[("ConfigMap", "heimdall-config")]["data"]
    assert pod["terminationGracePeriodSeconds"] >= float(config["HEIMDALL_SHUTDOWN_TIMEOUT_S"]) + 30
    secrets = {e["valueFrom"]["secretKeyRef"]["key"] for e in c["env"] if "valueFrom" in e}
    assert secrets == SECRET_KEYS
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/cache"}
    assert config["HEIMDALL_MODEL_CACHE_DIR"].startswith("/cache/")
    # the ConfigMap and the Secret's keys are settings a worker accepts
    env = {**config, "HEIMDALL_BROKER_URL": "amqp://u:p@rabbitmq//", "HEIMDALL_RESULT_BACKEND": "redis://:p@redis/0",
           "HEIMDALL_CACHE_URL": "redis://:p@redis/1", "HEIMDALL_DATABASE_URL": "postgresql://u:p@db/heimdall"}
    mp = pytest.MonkeyPatch()
    try:
        for k, v in env.items():
            if k.startswith("HEIMDALL_"):
                mp.setenv(k, v)
        s = Settings.from_env()
    finally:
        mp.undo()
    assert s.metrics_port == int(c["ports"][0]["containerPort"]) and s.log_format == "json"
    pdb = objects[("PodDisruptionBudget", "heimdall-worker")]
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    job = objects[("Job", "heimdall-db-init")]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["heimdall-inference", "db", "init"]


def test_keda_scales_the_worker_deployment_on_the_live_queue(objects):
    so = objects[("ScaledObject", "heimdall-worker")]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["spec"]["scaleTargetRef"]["name"] == objects[("Deployment", "heimdall-worker")]["metadata"]["name"]
    assert 1 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq" and trigger["metadata"]["queueName"] == "heimdall.predict"
    assert trigger["metadata"]["mode"] in ("QueueLength", "MessageRate") and int(trigger["metadata"]["value"]) > 0
    auth = objects[("TriggerAuthentication", trigger["authenticationRef"]["name"])]
    (ref,) = auth["spec"]["secretTargetRef"]
    # KEDA takes one amqp:// URL, not the workers' ';'-separated failover list: a key of its own
    assert ref["parameter"] == "host" and ref["name"] == "heimdall-secrets" and ref["key"] == "keda-broker-url"
