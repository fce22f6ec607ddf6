"""A real worker as a subprocess: ``celery -A heimdall_inference.worker worker`` with given settings.

Used by the embedded demo, the service benchmark and the integration tests; the worker runs from the
repository root (where ``celeryconfig.py`` is) with the settings passed as ``HEIMDALL_*`` variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..settings import Settings

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """A real ``celery -A heimdall_inference.worker worker`` subprocess with the given settings."""

    def __init__(self, settings: Settings, log_path: Path, *, concurrency: int = 2, pool: str = "prefork",
                 extra_env: dict[str, str] | None = None) -> None:
        root = Path(__file__).resolve().parents[2]  # celeryconfig.py beside the package
        env = {**os.environ, **settings.to_env(), **(extra_env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")
        self.name = f"heimdall-{uuid.uuid4().hex[:8]}@%h"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "heimdall_inference.worker", "worker", "--pool", pool,
             "--concurrency", str(concurrency), "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "-n", self.name],
            cwd=root, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the worker logs that it is ready (raises if it exits or times out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout_s: float = 30.0) -> int:
        """Warm shutdown (SIGTERM: finish running tasks), then kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
