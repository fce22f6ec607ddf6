"""The store interface, the row shapes shared by every backend, and an in-memory store for tests."""

from __future__ import annotations

import threading
from typing import Any, Protocol

__all__ = ["Store", "MemoryStore", "fix_row", "rejection_row", "FIX_COLUMNS", "REJECTION_COLUMNS"]

FIX_COLUMNS = ("captured_at", "fix_key", "task_id", "request_id", "lat", "lon", "east_m", "north_m",
               "cov_ee_m2", "cov_en_m2", "cov_nn_m2", "semi_major_95_m", "semi_minor_95_m", "orientation_95_deg",
               "receivers", "model_name", "model_version", "cached", "timings_ms", "fix")
REJECTION_COLUMNS = ("task_id", "request_id", "code", "message", "field", "receivers", "size_bytes")


def fix_row(fix: dict[str, Any]) -> dict[str, Any]:
    """A ``heimdall.fix/v1`` document -> one ``predictions`` row.

    The idempotency key is the client's ``request_id`` when it sent one, else the task id: a
    redelivered task (same task id) or a resubmitted request (same request id) never writes twice.
    """
    cov = fix["uncertainty"]["covariance_enu_m2"]
    e95 = fix["uncertainty"]["ellipses"][-1]
    key = fix.get("request_id") or fix.get("task_id")
    if not key:
        raise ValueError("a stored fix needs a request_id or a task_id")
    return {
        "captured_at": fix["captured_at"], "fix_key": key, "task_id": fix.get("task_id"),
        "request_id": fix.get("request_id"), "lat": fix["position"]["lat"], "lon": fix["position"]["lon"],
        "east_m": fix["position"].get("east_m"), "north_m": fix["position"].get("north_m"),
        "cov_ee_m2": cov[0][0], "cov_en_m2": cov[0][1], "cov_nn_m2": cov[1][1],
        "semi_major_95_m": e95["semi_major_m"], "semi_minor_95_m": e95["semi_minor_m"],
        "orientation_95_deg": e95["orientation_deg"], "receivers": list(fix["receivers_used"]),
        "model_name": fix["model"]["name"], "model_version": fix["model"]["version"], "cached": bool(fix["cached"]),
        "timings_ms": fix.get("timings_ms", {}), "fix": _without_geojson(fix),
    }


def _without_geojson(fix: dict[str, Any]) -> dict[str, Any]:
    """The stored document: the GeoJSON ring (half the bytes) is derived from the covariance."""
    u = {k: v for k, v in fix["uncertainty"].items() if k != "geojson"}
    return {**fix, "uncertainty": u}


def rejection_row(error: dict[str, Any], *, task_id: str | None, request_id: str | None = None,
                  receivers: list[str] | None = None, size_bytes: int | None = None) -> dict[str, Any]:
    """A structured payload error -> one ``rejections`` row (never the IQ)."""
    return {"task_id": task_id, "request_id": request_id, "code": error["code"], "message": error["message"][:500],
            "field": error.get("field"), "receivers": receivers or [], "size_bytes": size_bytes}


class Store(Protocol):
    """What the service needs from a database."""

    def init_schema(self) -> dict[str, Any]:
        """Create tables (and hypertable/policies where TimescaleDB exists); returns what it did."""

    def write_fixes(self, rows: list[dict[str, Any]]) -> int:
        """Insert fix rows idempotently in one transaction; returns how many were new.

        Raises TransientError when the database cannot be reached (retry), StorageError otherwise.
        """

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        """Record rejected payloads."""

    def count_fixes(self) -> int:
        """Rows in ``predictions``."""

    def count_rejections(self) -> int:
        """Rows in ``rejections``."""

    def close(self) -> None:
        """Release connections."""


class MemoryStore:
    """A process-local store with the same idempotency rule, for unit tests and seams."""

    def __init__(self) -> None:
        self.fixes: dict[tuple[str, str], dict[str, Any]] = {}
        self.rejections: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def init_schema(self) -> dict[str, Any]:
        return {"backend": "memory"}

    def write_fixes(self, rows: list[dict[str, Any]]) -> int:
        with self._lock:
            new = 0
            for r in rows:
                k = (r["fix_key"], r["captured_at"])
                if k not in self.fixes:
                    self.fixes[k] = r
                    new += 1
            return new

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self.rejections.extend(rows)

    def count_fixes(self) -> int:
        return len(self.fixes)

    def count_rejections(self) -> int:
        return len(self.rejections)

    def close(self) -> None:
        pass
