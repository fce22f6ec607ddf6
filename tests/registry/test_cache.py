"""The host's model cache: verified versions, atomic stores, alias pointers to fall back on."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from heimdall_inference.errors import RegistryError
from heimdall_inference.registry.cache import ModelCache


def _fetcher(blob: bytes, calls: list | None = None):
    def fetch(tmp: Path) -> Path:
        if calls is not None:
            calls.append(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "m.onnx").write_bytes(blob)
        return tmp / "m.onnx"
    return fetch


def test_a_stored_version_is_found_again_and_a_damaged_one_is_not(tmp_path):
    blob = b"onnx bytes"
    sha = hashlib.sha256(blob).hexdigest()
    cache = ModelCache(tmp_path)
    got = cache.store("m", "3", sha, _fetcher(blob), source="mlflow-artifacts:/1/x")
    assert got.path.read_bytes() == blob and cache.lookup("m", "3", sha) == got
    assert [p.name for p in (tmp_path / "m").iterdir()] == [f"3-{sha[:16]}"]  # no temporary left
    got.path.write_bytes(b"tampered")
    assert cache.lookup("m", "3", sha) is None


def test_a_wrong_checksum_or_a_failed_check_keeps_nothing(tmp_path):
    cache = ModelCache(tmp_path)
    with pytest.raises(RegistryError, match="sha256"):
        cache.store("m", "1", "0" * 64, _fetcher(b"other bytes"))

    def refuse(path: Path) -> None:
        raise RegistryError("breaks the contract")

    blob = b"x"
    with pytest.raises(RegistryError, match="contract"):
        cache.store("m", "2", hashlib.sha256(blob).hexdigest(), _fetcher(blob), check=refuse)
    assert list((tmp_path / "m").iterdir()) == []


def test_concurrent_stores_of_one_version_end_with_one_directory(tmp_path):
    blob = b"same model" * 1000
    sha = hashlib.sha256(blob).hexdigest()
    cache = ModelCache(tmp_path)
    results, errors = [], []

    def store():
        try:
            results.append(cache.store("m", "7", sha, _fetcher(blob)))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len({r.path for r in results}) == 1
    assert [p.name for p in (tmp_path / "m").iterdir()] == [f"7-{sha[:16]}"]


def test_alias_pointers_remember_the_last_verified_version(tmp_path):
    cache = ModelCache(tmp_path)
    assert cache.remembered("m", "production") is None
    for version, blob in (("1", b"one"), ("2", b"two")):
        sha = hashlib.sha256(blob).hexdigest()
        cache.store("m", version, sha, _fetcher(blob))
        cache.remember("m", "production", version, sha)
    assert cache.remembered("m", "production").version == "2"
    (tmp_path / "m" / "aliases" / "production.json").write_text("{not json")
    assert cache.remembered("m", "production") is None
