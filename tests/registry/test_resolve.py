"""Resolving HEIMDALL_MODEL_URI in a worker's main process: download once, verify, fall back, refuse."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from heimdall_inference.core.session import default_model_path
from heimdall_inference.errors import RegistryError, RegistryUnavailable
from heimdall_inference.registry.cache import file_sha256
from heimdall_inference.registry.resolve import resolve_model
from heimdall_inference.registry.version import RegisteredVersion


class FakeRegistry:
    """Answers like the registry would, from a local file; counts downloads."""

    def __init__(self, path: Path, *, version: str = "4", sha256: str | None = None, down: bool = False) -> None:
        self.path, self.down, self.downloads = path, down, 0
        self.v = RegisteredVersion(name="localization_model", version=version, aliases=("production",),
                                   sha256=file_sha256(path) if sha256 is None else sha256)

    def get(self, name, *, alias=None, version=None):
        if self.down:
            raise RegistryUnavailable("connection refused")
        if alias not in (None, "production"):
            raise RegistryError(f"{name}@{alias}: RESOURCE_DOES_NOT_EXIST")
        return self.v

    def download(self, v, dst: Path) -> Path:
        self.downloads += 1
        dst.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.path, dst / "localization_model.onnx"))


def _no_check(path: Path) -> None:
    return None


def test_the_shipped_model_and_files_need_no_registry(tmp_path):
    assert resolve_model("", cache_dir=tmp_path).source == "shipped"
    got = resolve_model(str(default_model_path()), cache_dir=tmp_path)
    assert (got.source, got.path, got.version) == ("file", default_model_path(), None)


def test_an_alias_is_downloaded_once_and_then_served_from_the_cache_when_the_registry_is_down(tmp_path):
    reg = FakeRegistry(default_model_path())
    first = resolve_model("models:/localization_model@production", cache_dir=tmp_path, registry=lambda: reg)
    again = resolve_model("models:/localization_model@production", cache_dir=tmp_path, registry=lambda: reg)
    assert (first.source, first.version, first.alias) == ("registry", "4", "production") and reg.downloads == 1
    assert again.path == first.path and first.path.read_bytes() == default_model_path().read_bytes()
    reg.down = True
    fallback = resolve_model("models:/localization_model@production", cache_dir=tmp_path, registry=lambda: reg)
    assert (fallback.source, fallback.version, fallback.path) == ("cache", "4", first.path)
    by_version = resolve_model("models:/localization_model/4", cache_dir=tmp_path, registry=lambda: reg)
    assert (by_version.source, by_version.path) == ("cache", first.path)


def test_nothing_acceptable_is_an_error(tmp_path):
    with pytest.raises(RegistryUnavailable, match="no verified copy"):
        resolve_model("models:/localization_model@production", cache_dir=tmp_path,
                      registry=lambda: FakeRegistry(default_model_path(), down=True))
    with pytest.raises(RegistryError, match="sha256"):
        resolve_model("models:/localization_model@production", cache_dir=tmp_path,
                      registry=lambda: FakeRegistry(default_model_path(), sha256="ab" * 32), check=_no_check)
    with pytest.raises(RegistryError, match="no sha256 tag"):
        resolve_model("models:/localization_model@production", cache_dir=tmp_path,
                      registry=lambda: FakeRegistry(default_model_path(), sha256=""))
    with pytest.raises(RegistryError, match="RESOURCE_DOES_NOT_EXIST"):
        resolve_model("models:/localization_model@canary", cache_dir=tmp_path,
                      registry=lambda: FakeRegistry(default_model_path()))
    assert not any(tmp_path.rglob("*.onnx"))


def test_a_file_that_breaks_the_contract_is_refused_by_the_real_check(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07not an onnx model")
    with pytest.raises(RegistryError, match="breaks the model contract"):
        resolve_model("models:/localization_model@production", cache_dir=tmp_path / "cache",
                      registry=lambda: FakeRegistry(broken))
    assert not any((tmp_path / "cache").rglob("*.onnx"))
