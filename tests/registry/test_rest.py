"""The worker's registry reader against a small HTTP server that answers what a broken or hostile registry
might: names that would leave the cache, answers that are not objects, oversized artifacts, a redirect."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from heimdall_inference.errors import RegistryError, RegistryUnavailable
from heimdall_inference.registry import rest
from heimdall_inference.registry.rest import RestRegistry
from heimdall_inference.registry.version import RegisteredVersion


class Answers(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict]] = {}
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        Answers.seen.append((path, self.headers.get("Authorization")))
        code, body, headers = Answers.routes.get(path, (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}', {}))
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Answers.routes, Answers.seen = {}, []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _alias(version: str, sha: str = "a" * 64) -> tuple[int, bytes, dict]:
    return 200, json.dumps({"model_version": {"name": "m", "version": version, "source": "mlflow-artifacts:/1/r/artifacts/model",
                                              "tags": [{"key": "sha256", "value": sha}]}}).encode(), {}


def test_versions_and_digests_that_could_name_other_folders_are_refused(server):
    reg = RestRegistry(server)
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = _alias("../../etc")
    with pytest.raises(RegistryError, match="not a version number"):
        reg.get("m", alias="production")
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = _alias("3", sha="../" * 10)
    with pytest.raises(RegistryError, match="is not a sha256"):
        reg.get("m", alias="production")
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = (200, b"[1, 2]", {})
    with pytest.raises(RegistryError, match="not a JSON object"):
        reg.get("m", alias="production")
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = _alias("3")
    assert reg.get("m", alias="production").version == "3"
    with pytest.raises(RegistryError, match="RESOURCE_DOES_NOT_EXIST"):
        reg.get("m", version="7")  # no such version: the registry's 404
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = (503, b"{}", {})
    with pytest.raises(RegistryUnavailable):
        reg.get("m", alias="production")


def test_an_artifact_larger_than_the_cap_is_not_kept(server, tmp_path, monkeypatch):
    monkeypatch.setattr(rest, "_MAX_ARTIFACT_BYTES", 1000)
    Answers.routes["/api/2.0/mlflow/model-versions/get-download-uri"] = (
        200, b'{"artifact_uri": "mlflow-artifacts:/1/r/artifacts/model"}', {})
    Answers.routes["/api/2.0/mlflow-artifacts/artifacts"] = (
        200, json.dumps({"files": [{"path": "evil/../../name.onnx", "is_dir": False}]}).encode(), {})  # no size given
    Answers.routes["/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model/name.onnx"] = (200, b"x" * 5000, {})
    v = RegisteredVersion(name="m", version="3", sha256="a" * 64)
    with pytest.raises(RegistryError, match="larger than 1000 bytes"):
        RestRegistry(server).download(v, tmp_path / "dl")
    Answers.routes["/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model/name.onnx"] = (200, b"x" * 10, {})
    got = RestRegistry(server).download(v, tmp_path / "dl2")
    assert got == tmp_path / "dl2" / "model.onnx" and got.read_bytes() == b"x" * 10  # never the registry's name


def test_credentials_are_not_sent_where_a_redirect_points(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
    Answers.routes["/api/2.0/mlflow/registered-models/alias"] = (302, b"", {"Location": server + "/elsewhere"})
    Answers.routes["/elsewhere"] = _alias("3")
    assert RestRegistry(server).get("m", alias="production").version == "3"
    assert Answers.seen == [("/api/2.0/mlflow/registered-models/alias", "Bearer secret-token"), ("/elsewhere", None)]
