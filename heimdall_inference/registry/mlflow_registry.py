"""The MLflow 3 model registry: register, promote (aliases), list, resolve, download.

Talks to ``MLFLOW_TRACKING_URI`` through ``MlflowClient`` (the ``mlflow-skinny`` package: the client,
no server). A registered version is the ONNX file (and its model card) logged as the artifacts of a run
in the ``heimdall-models`` experiment, stored where the tracking server keeps artifacts (S3/MinIO
through ``--artifacts-destination``), with tags a worker checks before serving it: ``sha256`` of the
file, ``contract`` (``heimdall.model/v1``), ``model_version`` (the version in its own metadata) and the
model card's figures (``card.*``). Stages are deprecated in MLflow; aliases (``production``,
``challenger``) name what serves.

MLflow's exceptions are translated here: a refusal (no such model, version or alias; a bad argument)
is :class:`RegistryError`, a server or artifact store that does not answer :class:`RegistryUnavailable`.
``timeout_s`` bounds each HTTP request and turns MLflow's own retries (seven, with backoff: minutes)
down to two, so a worker whose registry is down at start falls back in seconds.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import RegistryError, RegistryUnavailable
from .version import DEFAULT_NAME, RegisteredVersion

__all__ = ["MlflowRegistry", "RegisteredVersion", "EXPERIMENT", "DEFAULT_NAME"]

EXPERIMENT = "heimdall-models"
_REFUSALS = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED",
             "UNAUTHENTICATED", "BAD_REQUEST", "NOT_FOUND"}


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        code = str(getattr(exc, "error_code", "") or "")
        message = str(exc).splitlines()[0][:300]
        if code in _REFUSALS:
            raise RegistryError(f"{what}: {message}") from exc
        raise RegistryUnavailable(f"{what}: the registry did not answer: {message}") from exc
    except OSError as exc:  # requests' ConnectionError, boto3's endpoint errors and timeouts are OSErrors
        raise RegistryUnavailable(f"{what}: the registry did not answer: {exc}") from exc
    except Exception as exc:  # botocore and requests errors that are not OSErrors
        if type(exc).__module__.split(".")[0] in {"botocore", "boto3", "requests", "urllib3"}:
            raise RegistryUnavailable(f"{what}: the artifact store did not answer: {exc}") from exc
        raise


def _card_tags(card: dict[str, Any]) -> dict[str, str]:
    """The model card's headline figures as flat tags: the nominal world's as ``card.model.median_km`` ..., every
    other world's as ``card.<world>.model.median_km`` ..."""
    worlds = dict(card.get("evaluations") or {})
    if not worlds and card.get("evaluation"):  # a card from before the worlds
        worlds = {"nominal": card["evaluation"]}
    out: dict[str, str] = {}
    for world, ev in worlds.items():
        prefix = "card." if world == "nominal" else f"card.{world}."
        for part in ("model", "grid_posterior"):
            for key in ("median_km", "p95_km", "ms_per_fix"):
                if key in (ev.get(part) or {}):
                    out[f"{prefix}{part}.{key}"] = str(ev[part][key])
            for conf, v in ((ev.get(part) or {}).get("coverage_pct") or {}).items():
                out[f"{prefix}{part}.coverage_{conf}"] = str(v)
        for key, v in (ev.get("ratios") or {}).items():
            out[f"{prefix}{key}"] = str(v)
    return out


def _card_figures(card: Path) -> list[Path]:
    """The PNG files a model card links to that lie beside it."""
    import re

    names = re.findall(r"!\[[^\]]*\]\(([A-Za-z0-9_.-]+\.png)\)", card.read_text())
    return [card.with_name(n) for n in dict.fromkeys(names) if card.with_name(n).is_file()]


class MlflowRegistry:
    """The registry at ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``)."""

    def __init__(self, tracking_uri: str | None = None, *, timeout_s: float | None = None) -> None:
        # MLflow prints a "View run" URL on stdout when a run ends: the CLI's stdout is JSON
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        if timeout_s is not None:  # MLflow reads these from the environment on every request
            os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(timeout_s))))
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
            os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if not self.tracking_uri:
            raise RegistryError("no registry: set MLFLOW_TRACKING_URI (e.g. http://mlflow:5000)")
        self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # -- reading -----------------------------------------------------------------------------------
    def _version(self, mv: Any, aliases: tuple[str, ...] | None = None) -> RegisteredVersion:
        tags = dict(mv.tags or {})
        return RegisteredVersion(name=mv.name, version=str(mv.version), sha256=tags.get("sha256", ""),
                                 aliases=tuple(aliases if aliases is not None else getattr(mv, "aliases", ()) or ()),
                                 source=str(mv.source or ""), run_id=str(mv.run_id or ""), tags=tags)

    def get(self, name: str, *, alias: str | None = None, version: str | None = None) -> RegisteredVersion:
        """The version an alias points at, or a version by number."""
        what = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        with _translated(what):
            mv = (self._client.get_model_version_by_alias(name, alias) if alias
                  else self._client.get_model_version(name, str(version)))
        return self._version(mv)

    def versions(self, name: str = DEFAULT_NAME) -> list[RegisteredVersion]:
        """Every version of ``name``, newest first, with the aliases that point at each."""
        with _translated(f"versions of {name}"):
            model = self._client.get_registered_model(name)
            found = self._client.search_model_versions(f"name='{name}'")
        by_version: dict[str, list[str]] = {}
        for alias, v in (model.aliases or {}).items():
            by_version.setdefault(str(v), []).append(alias)
        out = [self._version(mv, tuple(sorted(by_version.get(str(mv.version), [])))) for mv in found]
        return sorted(out, key=lambda v: int(v.version), reverse=True)

    def download(self, v: RegisteredVersion, dst: Path) -> Path:
        """The version's ONNX file, downloaded into ``dst`` (exactly one ``.onnx`` among its artifacts)."""
        import mlflow
        import mlflow.artifacts

        dst.mkdir(parents=True, exist_ok=True)
        with _translated(f"downloading models:/{v.name}/{v.version}"):
            mlflow.set_tracking_uri(self.tracking_uri)
            mlflow.set_registry_uri(self.tracking_uri)
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{v.name}/{v.version}",
                                                           dst_path=str(dst), tracking_uri=self.tracking_uri))
        files = sorted(got.rglob("*.onnx")) if got.is_dir() else [got]
        if len(files) != 1:
            raise RegistryError(f"models:/{v.name}/{v.version} holds {len(files)} .onnx files; expected one")
        return files[0]

    # -- writing -----------------------------------------------------------------------------------
    def register(self, path: Path, *, name: str = DEFAULT_NAME, card: Path | None = None) -> RegisteredVersion:
        """Log ``path`` (and its model card) as a new version of ``name``. The file must satisfy the model
        contract (it is loaded and checked first); its sha256, contract and card figures become tags."""
        import mlflow

        from ..core.session import ModelSession
        from ..core.spec import SPEC_FORMAT
        from ..errors import ModelLoadError

        try:
            session = ModelSession(path)
        except ModelLoadError as exc:
            raise RegistryError(f"{path} is not registered: {exc}") from exc
        spec = session.spec
        tags = {"sha256": session.sha256, "contract": SPEC_FORMAT, "model_version": spec.version,
                "model_name": spec.name, **_card_tags(spec.card)}
        from ..core.session import card_path

        card = card if card is not None else card_path(path)
        with _translated(f"registering {path.name} as {name}"):
            mlflow.set_tracking_uri(self.tracking_uri)
            exp = self._client.get_experiment_by_name(EXPERIMENT)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(EXPERIMENT)
            run = self._client.create_run(exp_id, tags={"heimdall.sha256": session.sha256})
            try:
                self._client.log_artifact(run.info.run_id, str(path), artifact_path="model")
                if card.is_file():
                    self._client.log_artifact(run.info.run_id, str(card), artifact_path="model")
                    for figure in _card_figures(card):  # the card's pictures (its reliability diagram)
                        self._client.log_artifact(run.info.run_id, str(figure), artifact_path="model")
                for k, v in tags.items():
                    self._client.set_tag(run.info.run_id, k, v)
            finally:
                self._client.set_terminated(run.info.run_id)
            try:
                self._client.create_registered_model(name)
            except Exception as exc:  # already there: fine
                if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
                    raise
            source = f"{run.info.artifact_uri}/model"
            mv = self._client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
        return self._version(mv, ())

    def promote(self, version: str, alias: str, *, name: str = DEFAULT_NAME) -> RegisteredVersion:
        """Point ``alias`` at ``version`` (which must exist and carry a sha256)."""
        v = self.get(name, version=version)
        if not v.sha256:
            raise RegistryError(f"models:/{name}/{version} has no sha256 tag: register it with heimdall-inference")
        with _translated(f"setting {name}@{alias}"):
            self._client.set_registered_model_alias(name, alias, str(version))
        return self.get(name, alias=alias)
