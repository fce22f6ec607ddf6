"""Which model a worker serves: ``HEIMDALL_MODEL_URI`` resolved, downloaded once per host, verified.

Runs in the worker's main process at start (before the pool forks; children load the file it found):

* the shipped model or a file: that file (its own metadata names it);
* ``models:/name@alias`` or ``models:/name/version``: ask the registry which version that is, take it
  from the host's :class:`~.cache.ModelCache` or download it there, check its sha256 against the
  registry's tag and its contract in a process of its own (:mod:`.verify`), and remember what the
  alias pointed at. If the registry does not answer, the version the alias pointed at last time is
  served from the cache, with a warning (``source="cache"``); with nothing cached, or a version that
  fails its checks, :class:`RegistryError` — and the worker does not start (it never takes tasks it
  cannot serve).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import RegistryError, RegistryUnavailable
from .cache import ModelCache
from .uri import parse_model_uri
from .verify import check_in_subprocess

__all__ = ["ResolvedModel", "ModelSet", "resolve_model", "default_cache_dir", "ref_uri"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """The file a worker serves and what it is called in results, rows and metrics."""

    path: Path | None  #: None: the shipped model
    source: Literal["shipped", "file", "registry", "cache"]
    name: str | None = None  #: registry name (None: the file's own metadata names it)
    version: str | None = None  #: registry version (None: the file's own metadata version)
    alias: str | None = None
    sha256: str | None = None
    uri: str = ""

    def label(self) -> dict[str, Any]:
        return {"uri": self.uri, "source": self.source, "name": self.name, "version": self.version,
                "alias": self.alias, "sha256": self.sha256}


def default_cache_dir(data_dir: str = "") -> Path:
    """``<data_dir>/models`` when a data folder is set, else ``$XDG_CACHE_HOME/heimdall/models``."""
    if data_dir:
        return Path(data_dir) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "heimdall" / "models"


def resolve_model(uri: str, *, cache_dir: Path, registry: Callable[[], Any] | None = None,
                  check: Callable[[Path], Any] = check_in_subprocess,
                  refused: set[tuple[str, str]] | None = None) -> ResolvedModel:
    """Resolve ``uri`` (``HEIMDALL_MODEL_URI``) to a verified local file.

    ``registry()`` makes the registry client (default: :class:`~.rest.RestRegistry` on
    ``MLFLOW_TRACKING_URI``). Raises :class:`RegistryError` when no acceptable model can be had, and
    :class:`~heimdall_inference.errors.ConfigError` for a URI it cannot parse. ``refused`` (the watch's)
    holds the (version, sha256) pairs that failed their checks: they are not downloaded again.
    """
    parsed = parse_model_uri(uri)
    if parsed.kind == "shipped":
        return ResolvedModel(path=parsed.path, source="shipped", uri=str(parsed))
    if parsed.kind == "file":
        return ResolvedModel(path=parsed.path, source="file", uri=str(parsed))
    if registry is None:
        from .rest import RestRegistry

        registry = RestRegistry
    cache = ModelCache(cache_dir)
    name, alias = str(parsed.name), parsed.alias
    try:
        client = registry()
        v = client.get(name, alias=alias, version=parsed.version)
        if not v.sha256:
            raise RegistryError(f"{parsed}: version {v.version} has no sha256 tag; refused")
        if refused is not None and (v.version, v.sha256) in refused:
            raise RegistryError(f"{parsed}: version {v.version} was refused before (sha256 or contract); not "
                                "downloaded again")
        cached = cache.lookup(name, v.version, v.sha256)
        if cached is None:
            log.info("downloading %s (version %s) into %s", parsed, v.version, cache.root)
            try:
                cached = cache.store(name, v.version, v.sha256, lambda tmp: client.download(v, tmp),
                                     check=lambda p: check(p), source=v.source)
            except RegistryUnavailable:
                raise
            except RegistryError:
                if refused is not None:
                    refused.add((v.version, v.sha256))
                raise
        if alias:
            cache.remember(name, alias, v.version, v.sha256)
        return ResolvedModel(path=cached.path, source="registry", name=name, version=v.version, alias=alias,
                             sha256=v.sha256, uri=str(parsed))
    except RegistryUnavailable as exc:
        fallback = cache.remembered(name, alias) if alias else None
        if fallback is None and parsed.version:
            fallback = cache.find(name, parsed.version)
        if fallback is None:
            raise RegistryUnavailable(f"{exc}; and no verified copy of {parsed} in {cache.root}") from exc
        log.warning("the model registry did not answer (%s): serving the cached version %s of %s, the one %s "
                    "pointed at when last resolved", exc, fallback.version, name, parsed)
        return ResolvedModel(path=fallback.path, source="cache", name=name, version=fallback.version, alias=alias,
                             sha256=fallback.sha256, uri=str(parsed))



@dataclass(frozen=True)
class ModelSet:
    """Every model a worker serves: its own (``HEIMDALL_MODEL_URI``), the other refs its routes name, and the models
    of the network's other bands (``HEIMDALL_BAND_MODELS``).

    ``others`` maps a ref (an alias or a version of the same registered model) to what it resolved to; a
    ref that could not be resolved (no such alias yet, a version refused) is absent, and requests routed
    to it are served by the primary. ``bands`` maps each band model's URI, in the order configured, to what
    it resolved to."""

    primary: ResolvedModel
    others: tuple[tuple[str, ResolvedModel], ...] = ()  #: (ref, model), sorted by ref
    bands: tuple[tuple[str, ResolvedModel], ...] = ()  #: (uri, model), in the order configured

    @classmethod
    def of(cls, primary: ResolvedModel, others: dict[str, ResolvedModel] | None = None,
           bands: dict[str, ResolvedModel] | None = None) -> "ModelSet":
        return cls(primary, tuple(sorted((others or {}).items())), tuple((bands or {}).items()))

    def other(self, ref: str) -> ResolvedModel | None:
        return dict(self.others).get(ref)

    def band(self, uri: str) -> ResolvedModel | None:
        return dict(self.bands).get(uri)

    def to_dict(self) -> dict[str, Any]:
        return {"primary": _model_doc(self.primary), "others": {ref: _model_doc(m) for ref, m in self.others},
                "bands": [[uri, _model_doc(m)] for uri, m in self.bands]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "ModelSet":
        return cls.of(_model_from(doc["primary"]), {ref: _model_from(m) for ref, m in doc.get("others", {}).items()},
                      {uri: _model_from(m) for uri, m in doc.get("bands", [])})


def _model_doc(m: ResolvedModel) -> dict[str, Any]:
    return {**asdict(m), "path": str(m.path) if m.path else None}


def _model_from(doc: dict[str, Any]) -> ResolvedModel:
    return ResolvedModel(**{**doc, "path": Path(doc["path"]) if doc.get("path") else None})


def ref_uri(primary_uri: str, ref: str) -> str:
    """``models:/<name>@<ref>`` (an alias) or ``models:/<name>/<ref>`` (a version) of the primary's model."""
    name = parse_model_uri(primary_uri).name
    return f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
