"""The per-worker exporter: prometheus-client's /metrics over the multiprocess files, /healthz, nothing else."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from heimdall_inference.ops.exporter import MetricsExporter


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_exporter_serves_metrics_health_and_nothing_else(tmp_path):
    state = {"status": "ok", "children": 2}
    exp = MetricsExporter(0, addr="127.0.0.1", health=lambda: state, multiprocess_dir=tmp_path).start()
    try:
        base = f"http://127.0.0.1:{exp.port}"
        assert _get(base + "/metrics")[0] == 200
        code, body, headers = _get(base + "/healthz")
        assert code == 200 and json.loads(body)["children"] == 2 and headers["Content-Type"] == "application/json"
        state["status"] = "unhealthy"
        assert _get(base + "/healthz")[0] == 503
        assert _get(base + "/other")[0] == 404
    finally:
        exp.stop()


def test_metrics_come_from_the_childrens_files_through_prometheus_clients_own_app(tmp_path):
    """Values written by other processes' multiprocess files are summed, and the endpoint negotiates the
    format like prometheus-client's own (OpenMetrics on request)."""
    import subprocess
    import sys

    code = ("from heimdall_inference.ops.metrics import ServiceMetrics\n"
            "m = ServiceMetrics()\n"
            "m.rejections.labels(code='bad_base64').inc(3)\n"
            "m.cache_lookups(2, 1)\n")
    for _ in range(2):  # two "children"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                       env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"})
    exp = MetricsExporter(0, addr="127.0.0.1", multiprocess_dir=tmp_path).start()
    try:
        base = f"http://127.0.0.1:{exp.port}/metrics"
        code_, text, _ = _get(base)
        assert code_ == 200
        assert 'heimdall_rejections_total{code="bad_base64"} 6.0' in text
        assert 'heimdall_cache_requests_total{result="hit"} 4.0' in text
        _, text, headers = _get(base, {"Accept": "application/openmetrics-text; version=1.0.0"})
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert 'heimdall_rejections_total{code="bad_base64"} 6.0' in text and text.endswith("# EOF\n")
    finally:
        exp.stop()


def test_stop_removes_a_folder_it_owns(tmp_path):
    folder = tmp_path / "mp"
    folder.mkdir()
    MetricsExporter(0, addr="127.0.0.1", multiprocess_dir=folder, remove_dir_on_stop=True).start().stop()
    assert not folder.exists()
