"""Storage adapters: where fixes and rejections are kept, the prediction cache, the IQ claim checks.

* ``predictions`` and ``rejections``: PostgreSQL/TimescaleDB (:mod:`.postgres`), SQLite for the
  embedded default (:mod:`.sqlite`), memory for unit tests (:class:`MemoryStore`);
  :func:`open_store` picks the backend from the database URL's scheme.
* the Redis prediction cache (:mod:`.cache`) and the S3 ``iq_ref`` fetcher (:mod:`.objectstore`).

Each module translates its library's exceptions (psycopg, sqlite3, redis, botocore) at the boundary.
"""

from __future__ import annotations

from .base import FixWrites, MemoryStore, Store, fix_row, rejection_row, shadow_row

__all__ = ["Store", "MemoryStore", "FixWrites", "fix_row", "shadow_row", "rejection_row", "open_store",
           "probe_database"]


def open_store(database_url: str, *, schema: str = "public", pool_max: int = 4,
               statement_timeout_ms: int = 10_000) -> Store:
    """A store for ``postgresql://…``, ``sqlite:///path`` or ``memory://``."""
    if database_url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(database_url, schema=schema, pool_max=pool_max, statement_timeout_ms=statement_timeout_ms)
    if database_url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(database_url.removeprefix("sqlite:///"))
    if database_url.startswith("memory://"):
        return MemoryStore()
    raise ValueError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]!r}")


def probe_database(database_url: str, *, timeout_s: float = 2.0) -> str | None:
    """Does the database answer (a fresh connection and ``SELECT 1`` within ``timeout_s``)? None, else why not."""
    if database_url.startswith(("postgresql://", "postgres://")):
        import psycopg

        try:
            with psycopg.connect(database_url, connect_timeout=max(1, int(timeout_s)),
                                 options=f"-c statement_timeout={int(timeout_s * 1000)}") as conn:
                conn.execute("SELECT 1")
            return None
        except psycopg.Error as exc:
            return f"PostgreSQL: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
    if database_url.startswith("sqlite:///"):
        import sqlite3
        from pathlib import Path

        path = Path(database_url.removeprefix("sqlite:///"))
        if not path.exists():
            return f"SQLite: {path} does not exist (heimdall-inference db init)"
        try:
            with sqlite3.connect(path, timeout=timeout_s) as conn:
                conn.execute("SELECT 1")
            return None
        except sqlite3.Error as exc:
            return f"SQLite: {exc}"
    return None  # memory://: always there
