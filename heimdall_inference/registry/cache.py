"""Verified model downloads on this host: one directory per registered version, written atomically.

::

    <root>/<name>/<version>-<sha256[:16]>/model.onnx   the file, whose sha256 was checked
    <root>/<name>/<version>-<sha256[:16]>/meta.json    name, version, sha256, source, when
    <root>/<name>/aliases/<alias>.json                  the version an alias pointed at when last resolved

A download goes to a hidden temporary directory beside its final place and is renamed into place only
once its checksum (and contract) checked out, so a reader never sees half a file, and two processes
downloading the same version at once both end with the one directory (the second rename loses, and
its copy is removed). The alias pointers are what a worker falls back to when the registry does not
answer at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RegistryError

__all__ = ["ModelCache", "CachedModel", "file_sha256"]

MODEL_FILE = "model.onnx"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class CachedModel:
    name: str
    version: str
    sha256: str
    path: Path


class ModelCache:
    """The model cache under ``root`` (created on first use)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _dir(self, name: str, version: str, sha256: str) -> Path:
        return self.root / name / f"{version}-{sha256[:16]}"

    def lookup(self, name: str, version: str, sha256: str) -> CachedModel | None:
        """The cached file of this version, if it is there and its checksum still holds."""
        path = self._dir(name, version, sha256) / MODEL_FILE
        if not path.is_file() or file_sha256(path) != sha256:
            return None
        return CachedModel(name, version, sha256, path)

    def find(self, name: str, version: str) -> CachedModel | None:
        """A verified copy of this version, whatever its digest (the registry, which knows it, does not answer)."""
        for d in sorted((self.root / name).glob(f"{version}-*")) if (self.root / name).is_dir() else []:
            try:
                sha256 = str(json.loads((d / "meta.json").read_text())["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            found = self.lookup(name, version, sha256) if d.name == f"{version}-{sha256[:16]}" else None
            if found is not None:
                return found
        return None

    def store(self, name: str, version: str, sha256: str, fetch: Callable[[Path], Path],
              check: Callable[[Path], None] = lambda p: None, source: str = "") -> CachedModel:
        """Fetch a version into the cache: ``fetch(tmp_dir)`` returns the downloaded ONNX file; its sha256
        must be ``sha256`` and ``check(path)`` must pass (RegistryError otherwise, nothing kept). A damaged
        copy already in place is replaced; a write this host cannot make is a RegistryError too."""
        final = self._dir(name, version, sha256)
        if self.root.resolve() not in final.resolve().parents:
            raise RegistryError(f"{name} version {version}: {final} is outside the model cache {self.root}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._sweep(final.parent)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        except OSError as exc:
            raise RegistryError(f"the model cache {self.root} is not writable: {exc}") from exc
        try:
            got = fetch(tmp / "download")
            actual = file_sha256(got)
            if actual != sha256:
                raise RegistryError(f"{name} version {version}: the artifact's sha256 is {actual}, the registry says "
                                    f"{sha256}; refused")
            os.replace(got, tmp / MODEL_FILE)
            shutil.rmtree(tmp / "download", ignore_errors=True)
            check(tmp / MODEL_FILE)
            (tmp / "meta.json").write_text(json.dumps({"name": name, "version": version, "sha256": sha256,
                                                       "source": source, "stored_at": time.time()}))
            _fsync(tmp / MODEL_FILE)
            _fsync(tmp / "meta.json")
            self._place(tmp, final, name, version, sha256)
        except OSError as exc:
            raise RegistryError(f"{name} version {version}: cannot store it in {self.root}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cached = self.lookup(name, version, sha256)
        if cached is None:
            raise RegistryError(f"{name} version {version}: not in the cache after storing it ({final})")
        return cached

    def _place(self, tmp: Path, final: Path, name: str, version: str, sha256: str) -> None:
        """Rename the verified folder into place; another process' intact copy wins, a damaged one is moved
        aside first."""
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return
            except OSError:
                if self.lookup(name, version, sha256) is not None:
                    return  # another process stored it first: use theirs
                if final.exists():  # damaged (a checksum that no longer holds): out of the way, then again
                    aside = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
                    os.rename(final, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                    continue
                raise
        raise OSError(f"could not place {final}")

    @staticmethod
    def _sweep(folder: Path, older_than_s: float = 3600.0) -> None:
        """Remove what interrupted downloads left (a killed process cannot clean up after itself)."""
        cutoff = time.time() - older_than_s
        for d in folder.glob(".tmp-*"):
            try:
                if d.stat().st_mtime < cutoff:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass

    def remember(self, name: str, alias: str, version: str, sha256: str) -> None:
        """Record that ``alias`` pointed at this version (atomically replaced)."""
        d = self.root / name / "aliases"
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{alias}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"version": version, "sha256": sha256, "at": time.time()}))
        os.replace(tmp, d / f"{alias}.json")

    def remembered(self, name: str, alias: str) -> CachedModel | None:
        """The cached version ``alias`` last pointed at, if its file is still there and intact."""
        try:
            doc = json.loads((self.root / name / "aliases" / f"{alias}.json").read_text())
            version, sha256 = str(doc["version"]), str(doc["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return self.lookup(name, version, sha256)
