"""The registry as a worker reads it: MLflow's REST API over plain HTTP, no ``mlflow`` package.

A worker needs two things from the registry: which version an alias points at (with its tags), and
that version's ONNX file. Both are a few HTTP requests (``/api/2.0/mlflow/registered-models/alias``,
``/model-versions/get``, and the tracking server's artifact proxy ``/api/2.0/mlflow-artifacts/``; an
``s3://`` source is read with boto3 at ``MLFLOW_S3_ENDPOINT_URL``), so the worker's runtime stays free of
``mlflow``: importing it costs ~1.6 s here and, through its tracing dependency, makes the ``redis``
client load OpenTelemetry too. The CLI's register/promote/list use the MLflow client
(:mod:`.mlflow_registry`).

Credentials are MLflow's own variables: ``MLFLOW_TRACKING_TOKEN`` (bearer) or
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (basic). A refusal (404, 400, 403) is
:class:`RegistryError`; a server that does not answer, times out or fails (5xx)
:class:`RegistryUnavailable`.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..errors import RegistryError, RegistryNotFound, RegistryUnavailable
from .version import RegisteredVersion

__all__ = ["RestRegistry"]

_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
_MAX_ARTIFACT_BYTES = 512 * 1024 * 1024  #: a model file larger than this is refused, not downloaded
_MAX_JSON_BYTES = 4 * 1024 * 1024  #: a registry answer larger than this is not read
_VERSION = re.compile(r"^[0-9]{1,9}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class RestRegistry:
    """Read-only registry client over MLflow's REST API at ``tracking_uri`` (default ``MLFLOW_TRACKING_URI``)."""

    def __init__(self, tracking_uri: str | None = None, *, timeout_s: float = 5.0) -> None:
        uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "").rstrip("/")
        if not uri.startswith(("http://", "https://")):
            raise RegistryError(f"MLFLOW_TRACKING_URI must be the tracking server's http(s) URL, not {uri!r}")
        self.base = uri
        self.timeout_s = timeout_s
        self._auth: str | None = None
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self._auth = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
            self._auth = "Basic " + base64.b64encode(pair.encode()).decode()

    def _open(self, path: str, query: dict[str, str] | None = None) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url)
        if self._auth:  # never forwarded to wherever a redirect points
            req.add_unredirected_header("Authorization", self._auth)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            detail = _error_text(exc)
            if exc.code >= 500 or exc.code == 429:
                raise RegistryUnavailable(f"{path}: the registry answered {exc.code}: {detail}") from exc
            if exc.code == 404 or "RESOURCE_DOES_NOT_EXIST" in detail:
                raise RegistryNotFound(f"{path}: {exc.code} {detail}") from exc
            raise RegistryError(f"{path}: {exc.code} {detail}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise RegistryUnavailable(f"{self.base}: the registry did not answer: {getattr(exc, 'reason', exc)}") from exc

    def _json(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        with self._open(path, query) as resp:
            try:
                doc = json.loads(resp.read(_MAX_JSON_BYTES + 1))
            except (ValueError, OSError, http.client.HTTPException) as exc:
                raise RegistryUnavailable(f"{path}: not a JSON answer: {exc}") from exc
        if not isinstance(doc, dict):
            raise RegistryError(f"{path}: the answer is not a JSON object")
        return doc

    def get(self, name: str, *, alias: str | None = None, version: str | None = None) -> RegisteredVersion:
        """The version an alias points at, or a version by number."""
        if alias:
            doc = self._json("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias})
        else:
            doc = self._json("/api/2.0/mlflow/model-versions/get", {"name": name, "version": str(version)})
        mv = doc.get("model_version")
        if not isinstance(mv, dict):
            raise RegistryError(f"models:/{name}: the registry's answer has no model_version")
        try:
            tags = {str(t["key"]): str(t["value"]) for t in mv.get("tags") or [] if isinstance(t, dict) and "key" in t}
            v = RegisteredVersion(name=name, version=str(mv.get("version", version)), sha256=tags.get("sha256", ""),
                                  aliases=tuple(str(a) for a in mv.get("aliases") or ()),
                                  source=str(mv.get("source", "")), run_id=str(mv.get("run_id", "")), tags=tags)
        except (TypeError, ValueError, KeyError) as exc:
            raise RegistryError(f"models:/{name}: an answer this reader cannot use: {exc}") from exc
        # both name a folder of the host's cache: nothing but a version number and a hex digest
        if not _VERSION.match(v.version):
            raise RegistryError(f"models:/{name}: version {v.version[:40]!r} is not a version number")
        if v.sha256 and not _SHA256.match(v.sha256):
            raise RegistryError(f"models:/{name}/{v.version}: the sha256 tag {v.sha256[:80]!r} is not a sha256")
        return v

    def download(self, v: RegisteredVersion, dst: Path) -> Path:
        """The version's one ``.onnx`` file, downloaded into ``dst``."""
        source = self._json("/api/2.0/mlflow/model-versions/get-download-uri",
                            {"name": v.name, "version": v.version}).get("artifact_uri") or v.source
        dst.mkdir(parents=True, exist_ok=True)
        if source.startswith("mlflow-artifacts:"):
            return self._download_proxied(urllib.parse.urlparse(source).path.lstrip("/"), dst, v)
        if source.startswith("s3://"):
            return _download_s3(source, dst, v)
        raise RegistryError(f"models:/{v.name}/{v.version}: artifacts at {source!r} are not readable by a worker "
                            "(mlflow-artifacts:/ through the tracking server, or s3://)")

    def _download_proxied(self, prefix: str, dst: Path, v: RegisteredVersion) -> Path:
        listing = self._json(_ARTIFACTS, {"path": prefix}).get("files") or []
        onnx = [f for f in listing if not f.get("is_dir") and str(f.get("path", "")).endswith(".onnx")]
        if len(onnx) != 1:
            raise RegistryError(f"models:/{v.name}/{v.version} holds {len(onnx)} .onnx files; expected one")
        name = Path(str(onnx[0]["path"])).name
        if int(onnx[0].get("file_size") or 0) > _MAX_ARTIFACT_BYTES:
            raise RegistryError(f"models:/{v.name}/{v.version}: {name} is larger than {_MAX_ARTIFACT_BYTES} bytes")
        out = dst / "model.onnx"  # never a name the registry chose
        with self._open(f"{_ARTIFACTS}/{urllib.parse.quote(prefix)}/{urllib.parse.quote(name)}") as resp:
            _copy_bounded(resp, out, f"models:/{v.name}/{v.version}")
        return out


def _copy_bounded(resp: Any, out: Path, what: str) -> None:
    """Copy a response body into ``out``, refusing more than the artifact cap; a read that fails is the
    registry's (unavailable), a write that fails is this host's (an error)."""
    total = 0
    try:
        f = open(out, "wb")
    except OSError as exc:
        raise RegistryError(f"{what}: cannot write {out}: {exc}") from exc
    with f:
        while True:
            try:
                block = resp.read(1 << 20)
            except (OSError, http.client.HTTPException) as exc:
                raise RegistryUnavailable(f"{what}: the download broke off: {exc}") from exc
            if not block:
                return
            total += len(block)
            if total > _MAX_ARTIFACT_BYTES:
                raise RegistryError(f"{what}: the artifact is larger than {_MAX_ARTIFACT_BYTES} bytes")
            try:
                f.write(block)
            except OSError as exc:
                raise RegistryError(f"{what}: cannot write {out}: {exc}") from exc


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        doc = json.loads(exc.read() or b"{}")
        return f"{doc.get('error_code', '')} {doc.get('message', '')}".strip()[:300]
    except (ValueError, OSError):
        return str(exc.reason)[:300]


def _download_s3(source: str, dst: Path, v: RegisteredVersion) -> Path:
    import boto3
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = source.removeprefix("s3://").partition("/")
    dst.mkdir(parents=True, exist_ok=True)
    s3 = boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None)
    try:
        objects = [o for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/").get("Contents", [])
                   if o["Key"].endswith(".onnx")]
        if len(objects) != 1:
            raise RegistryError(f"models:/{v.name}/{v.version} holds {len(objects)} .onnx files; expected one")
        if int(objects[0].get("Size") or 0) > _MAX_ARTIFACT_BYTES:
            raise RegistryError(f"{source}: the artifact is larger than {_MAX_ARTIFACT_BYTES} bytes")
        out = dst / "model.onnx"
        s3.download_file(bucket, objects[0]["Key"], str(out))
    except ClientError as exc:
        raise RegistryError(f"{source}: {exc}") from exc
    except (BotoCoreError, Boto3Error) as exc:  # botocore wraps connection failures
        raise RegistryUnavailable(f"{source}: the artifact store did not answer: {exc}") from exc
    except OSError as exc:  # this host's disk
        raise RegistryError(f"{source}: cannot write {dst}: {exc}") from exc
    return out
