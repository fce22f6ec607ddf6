"""Storage adapters: where fixes and rejections are kept, the prediction cache, the IQ claim checks.

* ``predictions`` and ``rejections``: PostgreSQL/TimescaleDB (:mod:`.postgres`), SQLite for the
  embedded default (:mod:`.sqlite`), memory for unit tests (:class:`MemoryStore`);
  :func:`open_store` picks the backend from the database URL's scheme.
* the Redis prediction cache (:mod:`.cache`) and the S3 ``iq_ref`` fetcher (:mod:`.objectstore`).

Each module translates its library's exceptions (psycopg, sqlite3, redis, botocore) at the boundary.
"""

from __future__ import annotations

from .base import FixWrites, MemoryStore, Store, fix_row, rejection_row, shadow_row

__all__ = ["Store", "MemoryStore", "FixWrites", "fix_row", "shadow_row", "rejection_row", "open_store"]


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
