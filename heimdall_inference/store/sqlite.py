"""SQLite store for the embedded default: the same tables and idempotency rule, no server."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StorageError, TransientError
from .base import EXPORT_COLUMNS, FIX_COLUMNS, PAIR_COLUMNS, REJECTION_COLUMNS, SHADOW_COLUMNS, FixWrites, other_payload

__all__ = ["SqliteStore"]

DDL = """
CREATE TABLE IF NOT EXISTS predictions (
    captured_at TEXT NOT NULL, fix_key TEXT NOT NULL, task_id TEXT, request_id TEXT,
    lat REAL NOT NULL, lon REAL NOT NULL, east_m REAL, north_m REAL,
    cov_ee_m2 REAL NOT NULL, cov_en_m2 REAL NOT NULL, cov_nn_m2 REAL NOT NULL,
    semi_major_95_m REAL, semi_minor_95_m REAL, orientation_95_deg REAL,
    receivers TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL, model_alias TEXT, quality_grade TEXT,
    cached INTEGER NOT NULL DEFAULT 0, timings_ms TEXT, fix TEXT NOT NULL,
    stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), digest TEXT,
    PRIMARY KEY (fix_key, captured_at)
);
CREATE TABLE IF NOT EXISTS shadow_fixes (
    captured_at TEXT NOT NULL, fix_key TEXT NOT NULL, served_version TEXT NOT NULL, model_name TEXT NOT NULL,
    model_version TEXT NOT NULL, model_alias TEXT, lat REAL NOT NULL, lon REAL NOT NULL, east_m REAL, north_m REAL,
    cov_ee_m2 REAL NOT NULL, cov_en_m2 REAL NOT NULL, cov_nn_m2 REAL NOT NULL,
    semi_major_95_m REAL, semi_minor_95_m REAL, orientation_95_deg REAL,
    stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (fix_key, captured_at, model_version)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    task_id TEXT, request_id TEXT, code TEXT NOT NULL, message TEXT NOT NULL, field TEXT,
    receivers TEXT NOT NULL DEFAULT '[]', size_bytes INTEGER, reject_key TEXT
);
"""
MIGRATIONS = {("predictions", "digest"): "ALTER TABLE predictions ADD COLUMN digest TEXT",
              ("predictions", "model_alias"): "ALTER TABLE predictions ADD COLUMN model_alias TEXT",
              ("predictions", "quality_grade"): "ALTER TABLE predictions ADD COLUMN quality_grade TEXT",
              ("rejections", "reject_key"): "ALTER TABLE rejections ADD COLUMN reject_key TEXT"}
"""Columns added since the first version, for files made by it (SQLite has no ADD COLUMN IF NOT EXISTS)."""
INDEXES = "CREATE UNIQUE INDEX IF NOT EXISTS rejections_once_idx ON rejections (reject_key, code)"


class SqliteStore:
    """One SQLite file shared by the embedded worker's processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        cols = ", ".join(FIX_COLUMNS)
        self._insert_fix = f"INSERT OR IGNORE INTO predictions ({cols}) VALUES ({', '.join('?' * len(FIX_COLUMNS))})"
        self._insert_shadow = (f"INSERT OR IGNORE INTO shadow_fixes ({', '.join(SHADOW_COLUMNS)}) VALUES "
                               f"({', '.join('?' * len(SHADOW_COLUMNS))})")
        self._insert_rej = (f"INSERT OR IGNORE INTO rejections ({', '.join(REJECTION_COLUMNS)}) VALUES "
                            f"({', '.join('?' * len(REJECTION_COLUMNS))})")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def _run(self, fn):
        try:
            conn = self._conn()
            with conn:
                return fn(conn)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a retry would not create it: db init would
                raise StorageError(f"SQLite: {exc}; run `heimdall-inference db init` first") from exc
            raise TransientError(f"SQLite busy or unavailable: {exc}") from exc  # locked, disk I/O: worth a retry
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite refused the operation: {exc}") from exc

    def init_schema(self, *, timescaledb: str = "auto") -> dict[str, Any]:
        if timescaledb == "on":
            raise ConfigError("HEIMDALL_TIMESCALEDB=on needs a PostgreSQL database, not SQLite")

        def go(conn: sqlite3.Connection) -> None:
            conn.executescript(DDL)
            for (table, column), stmt in MIGRATIONS.items():
                if column not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    conn.execute(stmt)
            conn.execute(INDEXES)

        self._run(go)
        return {"backend": "sqlite", "path": str(self.path), "timescaledb": False}

    def write_fixes(self, rows: list[dict[str, Any]], shadows: list[dict[str, Any] | None] | None = None) -> FixWrites:
        def values(r: dict[str, Any]) -> tuple:
            out = []
            for c in FIX_COLUMNS:
                v = r[c]
                out.append(json.dumps(v) if c in ("receivers", "timings_ms", "fix") else v)
            return tuple(out)

        def go(conn: sqlite3.Connection) -> FixWrites:
            before = conn.total_changes
            conn.executemany(self._insert_fix, [values(r) for r in rows])
            new = conn.total_changes - before
            conflicts = set()
            if new != len(rows):
                for i, r in enumerate(rows):
                    if r.get("digest"):
                        got = conn.execute("SELECT digest FROM predictions WHERE fix_key = ? AND captured_at = ?",
                                           (r["fix_key"], r["captured_at"])).fetchone()
                        if got is not None and other_payload(got[0], r["digest"]):
                            conflicts.add(i)
            beside = [tuple(sh[c] for c in SHADOW_COLUMNS) for i, sh in enumerate(shadows or ())
                      if sh is not None and i not in conflicts]
            if beside:
                conn.execute("SAVEPOINT shadows")  # a refused shadow row never takes the fixes with it
                try:
                    conn.executemany(self._insert_shadow, beside)
                    conn.execute("RELEASE SAVEPOINT shadows")
                except sqlite3.OperationalError as exc:
                    if "no such table" not in str(exc):
                        raise  # busy, locked, I/O: the whole write is retried
                    conn.execute("ROLLBACK TO SAVEPOINT shadows")
                    return FixWrites(new, frozenset(conflicts), f"SQLite refused the shadow rows: {exc}")
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO SAVEPOINT shadows")
                    return FixWrites(new, frozenset(conflicts), f"SQLite refused the shadow rows: {exc}")
            return FixWrites(new, frozenset(conflicts))

        return self._run(go) if rows else FixWrites(0)

    def shadow_pairs(self, since: str | None = None, limit: int = 1_000_000) -> list[dict[str, Any]]:
        cols = ", ".join([f"p.{c.removeprefix('served_')}" for c in PAIR_COLUMNS[:8]] +
                         [f"s.{c.removeprefix('shadow_')}" for c in PAIR_COLUMNS[8:]])
        rows = self._run(lambda conn: conn.execute(
            f"SELECT {cols} FROM predictions p JOIN shadow_fixes s USING (fix_key, captured_at) "
            "WHERE p.captured_at >= ? ORDER BY p.captured_at DESC LIMIT ?", (since or "", int(limit))).fetchall())
        return [dict(zip(PAIR_COLUMNS, r)) for r in rows]

    def recent_fixes(self, since: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = self._run(lambda conn: conn.execute(
            f"SELECT {', '.join(EXPORT_COLUMNS)} FROM predictions WHERE captured_at >= ? ORDER BY captured_at DESC "
            "LIMIT ?", (since or "", int(limit))).fetchall())
        out = [dict(zip(EXPORT_COLUMNS, r)) for r in rows]
        for r in out:
            r["receivers"], r["cached"] = json.loads(r["receivers"]), bool(r["cached"])
        return out

    def arm_counts(self, since: str | None = None) -> list[dict[str, Any]]:
        rows = self._run(lambda conn: conn.execute(
            "SELECT model_version, model_alias, count(*) FROM predictions WHERE captured_at >= ? GROUP BY 1, 2 "
            "ORDER BY 1, 2", (since or "",)).fetchall())
        return [{"model_version": v, "model_alias": a, "fixes": n} for v, a, n in rows]

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._run(lambda conn: conn.executemany(self._insert_rej, [
                tuple(json.dumps(r[c]) if c == "receivers" else r[c] for c in REJECTION_COLUMNS) for r in rows]))

    def count_rejections(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT count(*) FROM rejections").fetchone()[0])

    def count_fixes(self) -> int:
        return self._run(lambda conn: conn.execute("SELECT count(*) FROM predictions").fetchone()[0])

    def fixes(self) -> list[dict[str, Any]]:
        """Every stored fix document, oldest capture first."""
        rows = self._run(lambda conn: conn.execute("SELECT fix FROM predictions ORDER BY captured_at").fetchall())
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
