"""The model contract checked in a process of its own: ``python -m heimdall_inference.registry.verify FILE``.

A worker's main process must not hold an ONNX Runtime session when its pool forks (sessions inherited
across fork can crash), so a downloaded file is loaded, and its inputs, outputs and metadata checked
(:class:`~heimdall_inference.core.session.ModelSession`), in a short-lived interpreter. It prints one
JSON line: ``{"ok": true, "name", "version", "sha256"}`` or ``{"ok": false, "error"}``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, RegistryError

__all__ = ["check_in_subprocess", "main"]


def check_in_subprocess(path: Path, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """Load ``path`` in another interpreter; its name, version and sha256, or RegistryError with the reason."""
    try:
        res = subprocess.run([sys.executable, "-m", "heimdall_inference.registry.verify", str(path)],
                             capture_output=True, text=True, timeout=timeout_s)
        doc = json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        raise RegistryError(f"could not check {path.name}: {exc}") from exc
    if not doc.get("ok"):
        raise RegistryError(f"{path.name} breaks the model contract: {doc.get('error')}")
    return doc


def main(argv: list[str] | None = None) -> int:
    from ..core.session import ModelSession

    (path,) = argv if argv is not None else sys.argv[1:]
    try:
        s = ModelSession(path)
    except ModelLoadError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1
    print(json.dumps({"ok": True, "name": s.spec.name, "version": s.spec.version, "sha256": s.sha256}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
