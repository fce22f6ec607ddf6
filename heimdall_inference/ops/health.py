"""A worker's probes, served by its exporter beside ``/metrics``.

* ``/healthz`` (liveness): the main process answers and its pool has live children. It does not look at
  the broker or the database: an outage of either is not cured by restarting workers (a liveness probe
  that failed on it would restart the whole fleet at once), and the worker reconnects by itself.
* ``/readyz`` (readiness): every pool child has loaded a verified model (each child writes a marker
  once its service is built and after each swap, :func:`mark_child_ready`), the consumer's broker
  connection is up, and the database answers a ``SELECT 1`` (asked at most every few seconds). An
  orchestrator stops routing to (or counting) a worker that is not ready, without killing it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["worker_health", "worker_readiness", "mark_child_ready", "clear_child_ready", "CachedCheck"]


def _children(worker: Any) -> list[int]:
    pool = getattr(worker, "pool", None)
    try:
        info = pool.info if pool is not None else {}
    except Exception:  # a pool still starting or already stopping
        return []
    procs = info.get("processes", []) if isinstance(info, dict) else []
    return [int(p) for p in procs]


def _connected(worker: Any) -> bool:
    conn = getattr(getattr(worker, "consumer", None), "connection", None)
    return bool(conn is not None and conn.connected)


def worker_health(worker: Any) -> dict[str, Any]:
    """Liveness of a Celery ``WorkController``: ``status`` "ok" while it has live children (broker facts are
    reported, not judged: see the module's docstring)."""
    children = _children(worker)
    return {"status": "ok" if children else "unhealthy", "children": len(children),
            "broker_connected": _connected(worker), "pid": os.getpid()}


def mark_child_ready(run_dir: Path | None, models: dict[str, Any]) -> None:
    """A pool child says it serves ``models`` now (a marker named by its pid, replaced atomically)."""
    if run_dir is None:
        return
    path = run_dir / f"child-{os.getpid()}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(models))
    os.replace(tmp, path)


def clear_child_ready(run_dir: Path | None) -> None:
    if run_dir is not None:
        (run_dir / f"child-{os.getpid()}.json").unlink(missing_ok=True)


class CachedCheck:
    """``check()`` -> None (ok) or a reason, asked at most every ``ttl_s`` seconds (probes come often)."""

    def __init__(self, check: Callable[[], str | None], ttl_s: float = 5.0) -> None:
        self._check = check
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._last: str | None = None

    def __call__(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                try:
                    self._last = self._check()
                except Exception as exc:  # a probe must answer, whatever the check raised
                    self._last = f"{type(exc).__name__}: {exc}"
                self._at = time.monotonic()
            return self._last


def worker_readiness(worker: Any, run_dir: Path | None, database: Callable[[], str | None]) -> dict[str, Any]:
    """Readiness: every live child has a model (its marker), the broker connection is up, the database answers."""
    children = _children(worker)
    loaded: dict[str, Any] = {}
    for pid in children:
        try:
            loaded[str(pid)] = json.loads((run_dir / f"child-{pid}.json").read_text()) if run_dir else None
        except (OSError, ValueError):
            pass
    without = [pid for pid in children if loaded.get(str(pid)) is None]
    if run_dir is not None:  # markers of children that are gone (killed, recycled): a reused pid must not read ready
        for f in run_dir.glob("child-*.json"):
            pid = f.stem.removeprefix("child-")
            if pid.isdigit() and int(pid) not in children and int(pid) != os.getpid():
                f.unlink(missing_ok=True)
    connected = _connected(worker)
    db = database()
    ready = bool(children) and not without and connected and db is None
    served = sorted({json.dumps(m, sort_keys=True) for m in loaded.values() if m})
    return {"status": "ready" if ready else "unready", "children": len(children),
            "children_without_model": len(without), "models": [json.loads(m) for m in served],
            "broker_connected": connected, "database": "ok" if db is None else db, "pid": os.getpid()}
