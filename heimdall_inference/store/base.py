"""The store interface, the row shapes shared by every backend, and an in-memory store for tests."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Protocol

__all__ = ["Store", "MemoryStore", "FixWrites", "fix_row", "shadow_row", "rejection_row", "storable_text",
           "FIX_COLUMNS", "SHADOW_COLUMNS", "PAIR_COLUMNS", "EXPORT_COLUMNS", "REJECTION_COLUMNS", "TIMESCALEDB_MODES", "since_timestamp"]

FIX_COLUMNS = ("captured_at", "fix_key", "task_id", "request_id", "lat", "lon", "east_m", "north_m",
               "cov_ee_m2", "cov_en_m2", "cov_nn_m2", "semi_major_95_m", "semi_minor_95_m", "orientation_95_deg",
               "receivers", "model_name", "model_version", "model_alias", "cached", "timings_ms", "fix", "digest",
               "quality_grade")
SHADOW_COLUMNS = ("captured_at", "fix_key", "served_version", "model_name", "model_version", "model_alias", "lat",
                  "lon", "east_m", "north_m", "cov_ee_m2", "cov_en_m2", "cov_nn_m2", "semi_major_95_m",
                  "semi_minor_95_m", "orientation_95_deg")
"""``shadow_fixes``: a shadow model's fix beside the served one (same key and capture time), never returned."""
_GEOMETRY = ("model_version", "model_alias", "east_m", "north_m", "cov_ee_m2", "cov_en_m2", "cov_nn_m2",
             "semi_major_95_m")
EXPORT_COLUMNS = ("fix_key", "captured_at", "lat", "lon", "cov_ee_m2", "cov_en_m2", "cov_nn_m2", "semi_major_95_m",
                  "semi_minor_95_m", "orientation_95_deg", "receivers", "model_name", "model_version", "model_alias",
                  "cached", "quality_grade")
"""What :meth:`Store.recent_fixes` returns per stored fix (``captured_at`` as ISO 8601 text)."""
PAIR_COLUMNS = tuple(f"served_{c}" for c in _GEOMETRY) + tuple(f"shadow_{c}" for c in _GEOMETRY)
"""What :meth:`Store.shadow_pairs` returns per stored fix with a shadow beside it."""
REJECTION_COLUMNS = ("reject_key", "task_id", "request_id", "code", "message", "field", "receivers", "size_bytes")
TIMESCALEDB_MODES = ("auto", "on", "off")
"""``init_schema(timescaledb=…)``: use the extension where it works (auto), require it (on), never (off)."""


class FixWrites(NamedTuple):
    """What one ``write_fixes`` call did."""

    new: int  #: rows inserted (the others were already there)
    conflicts: frozenset[int] = frozenset()  #: indexes of rows whose key was stored with another payload digest
    shadow_error: str | None = None  #: why the shadow rows were not stored (the fixes were: a shadow never fails them)


def since_timestamp(hours: float | None) -> str | None:
    """The capture time ``hours`` ago, as stored rows write theirs (ISO 8601 UTC, milliseconds, "Z"), for the
    ``since`` of the read methods; None (all rows) for None."""
    if hours is None:
        return None
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def storable_text(text: str | None, limit: int | None = None) -> str | None:
    """``text`` as every store can keep it: lone surrogates and NUL (which PostgreSQL's text refuses)
    replaced, cut to ``limit`` characters."""
    if text is None:
        return None
    if limit is not None:
        text = text[:limit]
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def other_payload(stored: str | None, new: str | None) -> bool:
    """Is a row stored with digest ``stored`` another payload than one with digest ``new``? Only digests of the
    same scheme compare: a digest names its scheme before a colon (``b3:`` for BLAKE3), none for the BLAKE2b
    digests of earlier versions, so a task redelivered across an upgrade is a duplicate, never a conflict."""
    if not stored or not new or stored == new:
        return False
    return _scheme(stored) == _scheme(new)


def _scheme(digest: str) -> str:
    head, sep, _ = digest.partition(":")
    return head if sep else "blake2b"


def fix_row(fix: dict[str, Any], digest: str = "") -> dict[str, Any]:
    """A ``heimdall.fix/v1`` document -> one ``predictions`` row.

    The idempotency key is the client's ``request_id`` when it sent one, else the task id: a
    redelivered task (same task id) or a resubmitted request (same request id) never writes twice.
    ``digest`` is the payload's digest (receivers and IQ): a request id stored with another digest
    for the same capture time is a conflict, not a duplicate.
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
        "model_name": fix["model"]["name"], "model_version": fix["model"]["version"],
        "model_alias": fix["model"].get("alias"), "cached": bool(fix["cached"]),
        "timings_ms": fix.get("timings_ms", {}), "fix": _without_geojson(fix), "digest": digest or None,
        "quality_grade": (fix.get("quality") or {}).get("grade"),
    }


def shadow_row(shadow: dict[str, Any], served: dict[str, Any]) -> dict[str, Any]:
    """A shadow model's fix -> one ``shadow_fixes`` row, keyed like the served fix it stands beside."""
    row = fix_row(shadow)
    return {**{c: row[c] for c in SHADOW_COLUMNS if c in row}, "fix_key": served.get("request_id") or served["task_id"],
            "captured_at": served["captured_at"], "served_version": served["model"]["version"]}


def _without_geojson(fix: dict[str, Any]) -> dict[str, Any]:
    """The stored document: the GeoJSON ring (half the bytes) is derived from the covariance."""
    u = {k: v for k, v in fix["uncertainty"].items() if k != "geojson"}
    return {**fix, "uncertainty": u}


def rejection_row(error: dict[str, Any], *, task_id: str | None, request_id: str | None = None,
                  receivers: list[str] | None = None, size_bytes: int | None = None,
                  key: str | None = None) -> dict[str, Any]:
    """A structured payload error -> one ``rejections`` row (never the IQ).

    ``key`` (default: the request id, else the task id) makes the row unique with its code: a
    redelivered or retried bad payload is recorded once. Text is made storable (NUL, lone surrogates).
    """
    key = key or request_id or task_id
    return {"reject_key": storable_text(key, 300), "task_id": storable_text(task_id, 300),
            "request_id": storable_text(request_id, 300), "code": error["code"],
            "message": storable_text(str(error["message"]), 500), "field": storable_text(error.get("field"), 200),
            "receivers": [storable_text(r, 64) for r in (receivers or [])], "size_bytes": size_bytes}


class Store(Protocol):
    """What the service needs from a database."""

    def init_schema(self, *, timescaledb: str = "auto") -> dict[str, Any]:
        """Create or migrate the tables (a hypertable with policies where TimescaleDB is used, see
        :data:`TIMESCALEDB_MODES`); returns what it did."""

    def write_fixes(self, rows: list[dict[str, Any]], shadows: list[dict[str, Any] | None] | None = None) -> FixWrites:
        """Insert fix rows idempotently in one transaction; returns how many were new and which rows
        conflict (their key is stored with another digest). ``shadows`` (aligned with ``rows``): a shadow
        model's row to store beside each fix, in the same transaction, except beside a conflicting one; shadow
        rows the database refuses are left out (``shadow_error``) and the fixes are stored all the same.

        Raises TransientError when the database cannot be reached (retry), StorageError otherwise.
        """

    def shadow_pairs(self, since: str | None = None, limit: int = 1_000_000) -> list[dict[str, Any]]:
        """Stored fixes captured since ``since`` (ISO 8601) with a shadow fix beside them: :data:`PAIR_COLUMNS`."""

    def recent_fixes(self, since: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        """The newest stored fixes captured since ``since`` (ISO 8601), at most ``limit``: :data:`EXPORT_COLUMNS`."""

    def arm_counts(self, since: str | None = None) -> list[dict[str, Any]]:
        """Stored fixes captured since ``since`` by model version and alias: ``{model_version, model_alias, fixes}``."""

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        """Record rejected payloads, once per (key, code). Raises TransientError when the database
        cannot be reached (the task retries, so the rejection is recorded once it is back)."""

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
        self.shadows: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rejections: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def init_schema(self, *, timescaledb: str = "auto") -> dict[str, Any]:
        return {"backend": "memory", "timescaledb": False}

    def write_fixes(self, rows: list[dict[str, Any]], shadows: list[dict[str, Any] | None] | None = None) -> FixWrites:
        with self._lock:
            new, conflicts = 0, set()
            for i, r in enumerate(rows):
                k = (r["fix_key"], r["captured_at"])
                if k not in self.fixes:
                    self.fixes[k] = r
                    new += 1
                elif other_payload(self.fixes[k].get("digest"), r.get("digest")):
                    conflicts.add(i)
            for i, sh in enumerate(shadows or ()):
                if sh is not None and i not in conflicts:
                    self.shadows.setdefault((sh["fix_key"], sh["captured_at"], sh["model_version"]), sh)
            return FixWrites(new, frozenset(conflicts))

    def shadow_pairs(self, since: str | None = None, limit: int = 1_000_000) -> list[dict[str, Any]]:
        out = []
        for (key, at, _), sh in sorted(self.shadows.items()):
            p = self.fixes.get((key, at))
            if p is not None and (since is None or at >= since):
                out.append({**{f"served_{c}": p[c] for c in _GEOMETRY}, **{f"shadow_{c}": sh[c] for c in _GEOMETRY}})
        return out[:limit]

    def recent_fixes(self, since: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = sorted((r for (_, at), r in self.fixes.items() if since is None or at >= since),
                      key=lambda r: r["captured_at"], reverse=True)
        return [{c: r.get(c) for c in EXPORT_COLUMNS} for r in rows[:limit]]

    def arm_counts(self, since: str | None = None) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str | None], int] = {}
        for (_, at), r in self.fixes.items():
            if since is None or at >= since:
                k = (r["model_version"], r.get("model_alias"))
                counts[k] = counts.get(k, 0) + 1
        return [{"model_version": v, "model_alias": a, "fixes": n} for (v, a), n in sorted(counts.items(), key=str)]

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            seen = {(r["reject_key"], r["code"]) for r in self.rejections if r.get("reject_key")}
            for r in rows:
                if not r.get("reject_key") or (r["reject_key"], r["code"]) not in seen:
                    self.rejections.append(r)
                    seen.add((r.get("reject_key"), r["code"]))

    def count_fixes(self) -> int:
        return len(self.fixes)

    def count_rejections(self) -> int:
        return len(self.rejections)

    def close(self) -> None:
        pass
