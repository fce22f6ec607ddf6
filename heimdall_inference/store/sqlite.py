"""SQLite store for the embedded default: the same tables and idempotency rule, no server."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from ..errors import StorageError, TransientError
from .base import FIX_COLUMNS, REJECTION_COLUMNS

__all__ = ["SqliteStore"]

DDL = """
CREATE TABLE IF NOT EXISTS predictions (
    captured_at TEXT NOT NULL, fix_key TEXT NOT NULL, task_id TEXT, request_id TEXT,
    lat REAL NOT NULL, lon REAL NOT NULL, east_m REAL, north_m REAL,
    cov_ee_m2 REAL NOT NULL, cov_en_m2 REAL NOT NULL, cov_nn_m2 REAL NOT NULL,
    semi_major_95_m REAL, semi_minor_95_m REAL, orientation_95_deg REAL,
    receivers TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
    cached INTEGER NOT NULL DEFAULT 0, timings_ms TEXT, fix TEXT NOT NULL,
    stored_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (fix_key, captured_at)
);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    task_id TEXT, request_id TEXT, code TEXT NOT NULL, message TEXT NOT NULL, field TEXT,
    receivers TEXT NOT NULL DEFAULT '[]', size_bytes INTEGER
);
"""


class SqliteStore:
    """One SQLite file shared by the embedded worker's processes (WAL, busy timeout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        cols = ", ".join(FIX_COLUMNS)
        self._insert_fix = f"INSERT OR IGNORE INTO predictions ({cols}) VALUES ({', '.join('?' * len(FIX_COLUMNS))})"
        self._insert_rej = (f"INSERT INTO rejections ({', '.join(REJECTION_COLUMNS)}) VALUES "
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
        except sqlite3.OperationalError as exc:  # locked, disk I/O: worth a retry
            raise TransientError(f"SQLite busy or unavailable: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite refused the operation: {exc}") from exc

    def init_schema(self) -> dict[str, Any]:
        self._run(lambda conn: conn.executescript(DDL))
        return {"backend": "sqlite", "path": str(self.path), "timescaledb": False}

    def write_fixes(self, rows: list[dict[str, Any]]) -> int:
        def values(r: dict[str, Any]) -> tuple:
            out = []
            for c in FIX_COLUMNS:
                v = r[c]
                out.append(json.dumps(v) if c in ("receivers", "timings_ms", "fix") else v)
            return tuple(out)

        def go(conn: sqlite3.Connection) -> int:
            before = conn.total_changes
            conn.executemany(self._insert_fix, [values(r) for r in rows])
            return conn.total_changes - before

        return self._run(go) if rows else 0

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
