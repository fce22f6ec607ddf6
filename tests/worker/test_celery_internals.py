"""The one module that reaches into Celery, kombu and billiard internals, and its version guard."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
import time
from pathlib import Path

import billiard.pool
import pytest

from heimdall_inference.errors import ConfigError
from heimdall_inference.worker import celery_internals as internals

PACKAGE = Path(internals.__file__).resolve().parents[1]


def test_the_installed_celery_kombu_and_billiard_are_the_tested_minors():
    """Fails when an install brings a minor version the internals were not written for."""
    internals.check_versions()
    assert {k: v.split(".")[:2] for k, v in internals.installed_versions().items()} == {
        k: [str(x) for x in v] for k, v in internals.TESTED_VERSIONS.items()}


@pytest.mark.parametrize("versions, bad", [
    ({"celery": "5.8.0", "kombu": "5.7.0", "billiard": "4.3.2"}, "celery 5.8.0"),
    ({"celery": "5.7.0", "kombu": "5.6.9", "billiard": "4.3.2"}, "kombu 5.6.9"),
    ({"celery": "5.7.0", "kombu": "5.7.0", "billiard": "4.4.0"}, "billiard 4.4.0"),
    ({"celery": "6.0.0rc1", "kombu": "5.7.0", "billiard": "4.3.2"}, "celery 6.0.0rc1"),
    ({"kombu": "5.7.0", "billiard": "4.3.2"}, "celery missing"),
])
def test_an_untested_minor_version_is_refused_by_name(versions, bad):
    with pytest.raises(ConfigError) as err:
        internals.check_versions(versions)
    assert bad in str(err.value) and "tested:" in str(err.value)


def test_patch_releases_of_the_tested_minors_are_accepted():
    internals.check_versions({"celery": "5.7.9", "kombu": "5.7.1", "billiard": "4.3.0"})


@pytest.mark.slow
def test_a_worker_refuses_to_start_on_an_untested_celery(tmp_path):
    """The real ``celery worker`` command, with celery reporting 5.8.0: it exits at start with one clear line,
    having started nothing (no metrics folder, no exporter)."""
    import socket

    from heimdall_inference.settings import Settings

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**Settings.embedded(tmp_path / "data", metrics_port=port).to_env(), "PATH": "/usr/bin:/bin",
           "TMPDIR": str(tmp)}
    code = ("import sys, celery; celery.__version__ = '5.8.0'\n"
            "from celery.__main__ import main\n"
            "sys.argv = ['celery', '-A', 'heimdall_inference.worker', 'worker', '--pool', 'solo',"
            " '--without-gossip', '--without-mingle']\n"
            "main()\n")
    root = PACKAGE.parent
    res = subprocess.run([sys.executable, "-c", code], cwd=root, env={**env, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "heimdall-inference uses internals of celery 5.8.0 (tested: 5.7.x)" in out
    assert " ready." not in out and "metrics on" not in out
    assert [p.name for p in tmp.iterdir() if p.name.startswith("heimdall-metrics-")] == []


def test_no_other_module_touches_celery_kombu_or_billiard_internals():
    """Every private access to a celery/kombu/billiard object lives in celery_internals.py.

    Checked on the source of every other module: no import of a celery/kombu/billiard module that is
    not documented API, no underscore attribute of anything but ``self`` and ``cls`` (our own objects
    keep their privates on ``self``), and no call of a worker Request's or pool's callback methods.
    """
    allowed_modules = {"celery", "celery.signals", "celery.result", "celery.exceptions", "celery.states",
                       "kombu", "kombu.serialization", "kombu.transport", "kombu.exceptions",
                       "celery.worker.control"}  # control_command: the documented way to add a remote control command
    request_api = {"on_accepted", "on_timeout", "on_success", "on_failure", "execute_using_pool", "time_limits",
                   "revoked"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "celery_internals.py":
            continue
        where = path.relative_to(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                names = []
            for name in names:
                if name.split(".")[0] in ("celery", "kombu", "billiard") and name not in allowed_modules:
                    offenders.append(f"{where}:{node.lineno} imports {name}")
            if isinstance(node, ast.Attribute):
                base = node.value.id if isinstance(node.value, ast.Name) else None
                if node.attr.startswith("_") and not node.attr.startswith("__") and base not in ("self", "cls"):
                    offenders.append(f"{where}:{node.lineno} uses .{node.attr}")
                if node.attr in request_api and base not in ("self", "cls", "internals", "batch"):
                    offenders.append(f"{where}:{node.lineno} calls .{node.attr}")
    assert offenders == []


def _sleepy(seconds: float) -> str:
    from billiard.exceptions import SoftTimeLimitExceeded

    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit"
    return "slept"


def test_apply_to_pool_runs_in_a_real_billiard_pool_with_its_callbacks():
    """billiard calls the timeout callback with keywords (soft=, timeout=): the adapter passes soft limits on."""
    pool = billiard.pool.Pool(1, enable_timeouts=True)  # as Celery's prefork pool builds it
    events: dict[str, list] = {"accepted": [], "soft": [], "done": [], "failed": []}
    finished = threading.Event()

    def done(result):
        events["done"].append(result)
        finished.set()

    try:
        internals.apply_to_pool(pool, _sleepy, (3.0,), on_accepted=lambda pid, t: events["accepted"].append(pid),
                                on_soft_timeout=events["soft"].append, on_done=done,
                                on_failed=events["failed"].append, soft_timeout_s=0.3, timeout_s=10.0)
        assert finished.wait(30)
    finally:
        pool.terminate()
    assert events["done"] == ["soft limit"] and events["soft"] == [0.3] and not events["failed"]
    assert len(events["accepted"]) == 1
