"""The package's layout holds: the worker's runtime path is free of tooling, and every module is documented."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "heimdall_inference"
RUNTIME = ["core", "worker", "store", "ops", "registry", "settings.py", "errors.py", "client.py", "__init__.py"]
TOOLING = ("heimdall_inference.lab", "heimdall_inference.bench", "heimdall_inference.cli",
           "heimdall_inference.registry.mlflow_registry")  # the MLflow client: the CLI's, never a worker's
HEAVY = ("matplotlib", "torch", "onnx", "psutil", "hypothesis", "pytest", "mlflow", "pandas")

_RUNTIME_PROBE = """
import json, sys
import redis                                  # redis 8 loads OpenTelemetry (and psutil) where it is installed
baseline = set(sys.modules)                   # (mlflow's tracing brings it in the test environment): not ours
from heimdall_inference.worker import app
app.loader.import_default_modules()          # what `celery -A heimdall_inference.worker worker` imports
import celeryconfig
from heimdall_inference.worker import batching, context, lifecycle, result_backend
from heimdall_inference.settings import Settings
ctx = context.build_child_context(Settings(database_url="memory://", cache_url=""))   # a child's set-up
from heimdall_inference.core.localizer import Localizer
payload = json.loads(sys.stdin.read())
fix = ctx.service.predict(payload, task_id="probe")                                   # a task's work
assert fix["schema"] == "heimdall.fix/v1"
print(json.dumps(sorted(set(sys.modules) - baseline)))
"""


def test_the_worker_runtime_imports_no_tooling(scenes_and_payloads):
    """A fresh interpreter that loads the worker app, sets up a child and computes a fix."""
    res = subprocess.run([sys.executable, "-c", _RUNTIME_PROBE], cwd=ROOT, input=json.dumps(scenes_and_payloads[1][0]),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "heimdall_inference.worker.tasks" in loaded and "onnxruntime" in loaded  # the probe did load the runtime
    assert "heimdall_inference.registry.resolve" in loaded
    assert [m for m in loaded if m.startswith(TOOLING)] == []
    assert [m for m in loaded if m.split(".")[0] in HEAVY] == []


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at the top or inside functions, resolved to absolute names."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out += [(node.lineno, name)] + [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def test_no_runtime_module_imports_tooling_even_lazily():
    offenders = []
    for entry in RUNTIME:
        for path in ([PACKAGE / entry] if entry.endswith(".py") else sorted((PACKAGE / entry).rglob("*.py"))):
            if ".".join(path.relative_to(ROOT).with_suffix("").parts).startswith(TOOLING):
                continue
            for line, name in _imports(path):
                if name.startswith(TOOLING) or name.split(".")[0] in HEAVY:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offenders == []


def test_core_knows_no_celery_database_or_redis():
    offenders = [f"{p.name}:{line} imports {name}" for p in sorted((PACKAGE / "core").glob("*.py"))
                 for line, name in _imports(p)
                 if name.split(".")[0] in ("celery", "kombu", "billiard", "redis", "psycopg", "psycopg_pool", "sqlite3",
                                           "boto3", "botocore", "prometheus_client")
                 or name.startswith(("heimdall_inference.worker", "heimdall_inference.store", "heimdall_inference.ops"))]
    assert offenders == []


def test_every_module_is_placed_in_the_architecture_document():
    """docs/architecture.md says, for each module, where it runs (worker main/child, producer, tooling)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(heimdall_inference/[\w/]+\.py)`", doc))
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert modules - listed == set(), "modules missing from docs/architecture.md"
    assert listed - modules == set(), "docs/architecture.md names modules that do not exist"


def test_nothing_in_the_project_refers_to_files_outside_it():
    """A user's clone has only the repository: only the CI script may look for the workplace's shared folder."""
    words = (".." + "/shared", "design" + ".md")  # spelled so that this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = [f for f in tracked if f != ".ci/run" and (ROOT / f).is_file()
               and any(word in (ROOT / f).read_text(errors="ignore") for word in words)]
    assert outside == []
