"""``/healthz`` of a worker: its pool has live children and its consumer is connected to the broker."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["worker_health"]


def worker_health(worker: Any) -> dict[str, Any]:
    """Health of a Celery ``WorkController``: ``status`` is "ok" or "unhealthy", with the facts behind it."""
    pool = getattr(worker, "pool", None)
    info = pool.info if pool is not None else {}
    children = len(info.get("processes", [])) if isinstance(info, dict) else 0
    consumer = getattr(worker, "consumer", None)
    conn = getattr(consumer, "connection", None)
    connected = bool(conn is not None and conn.connected)
    return {"status": "ok" if children and connected else "unhealthy", "children": children,
            "broker_connected": connected, "pid": os.getpid()}
