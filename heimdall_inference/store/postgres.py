"""PostgreSQL store: a ``predictions`` hypertable where TimescaleDB exists, the same table otherwise.

psycopg errors are translated here: connection-level failures (``OperationalError``, pool timeouts)
become :class:`TransientError` (the task retries with backoff), the rest :class:`StorageError`.
One pool per process (create it after fork).
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import StorageError, TransientError
from .base import FIX_COLUMNS, REJECTION_COLUMNS

__all__ = ["PostgresStore"]

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# {schema} is filled in with sql.Identifier (quoted by psycopg), never with string formatting.
DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.predictions (
    captured_at        timestamptz      NOT NULL,
    fix_key            text             NOT NULL,
    task_id            text,
    request_id         text,
    lat                double precision NOT NULL,
    lon                double precision NOT NULL,
    east_m             double precision,
    north_m            double precision,
    cov_ee_m2          double precision NOT NULL,
    cov_en_m2          double precision NOT NULL,
    cov_nn_m2          double precision NOT NULL,
    semi_major_95_m    double precision,
    semi_minor_95_m    double precision,
    orientation_95_deg double precision,
    receivers          text[]           NOT NULL,
    model_name         text             NOT NULL,
    model_version      text             NOT NULL,
    cached             boolean          NOT NULL DEFAULT false,
    timings_ms         jsonb,
    fix                jsonb            NOT NULL,
    stored_at          timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (fix_key, captured_at)
);
CREATE INDEX IF NOT EXISTS predictions_captured_at_idx ON {schema}.predictions (captured_at DESC);
CREATE TABLE IF NOT EXISTS {schema}.rejections (
    id          bigserial   PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    task_id     text,
    request_id  text,
    code        text        NOT NULL,
    message     text        NOT NULL,
    field       text,
    receivers   text[]      NOT NULL DEFAULT '{{}}',
    size_bytes  integer
);
"""

# {table} is the predictions table's name as a text literal (a regclass argument), {schema} an Identifier.
TIMESCALE = """
SELECT create_hypertable({table}, 'captured_at', if_not_exists => TRUE, migrate_data => TRUE);
ALTER TABLE {schema}.predictions SET (timescaledb.compress, timescaledb.compress_segmentby = 'model_version');
SELECT add_compression_policy({table}, INTERVAL '7 days', if_not_exists => TRUE);
SELECT add_retention_policy({table}, INTERVAL '400 days', if_not_exists => TRUE);
"""


class PostgresStore:
    """``predictions`` and ``rejections`` in one schema, through a small connection pool."""

    def __init__(self, url: str, *, schema: str = "public", pool_max: int = 4, timeout_s: float = 5.0) -> None:
        if not _IDENT.match(schema):  # quoting would make any name safe; this keeps names plain and portable
            raise ValueError(f"invalid schema name {schema!r}")
        self.schema = schema
        self._schema = sql.Identifier(schema)
        self._predictions = sql.Identifier(schema, "predictions")
        self._rejections = sql.Identifier(schema, "rejections")
        self.timeout_s = timeout_s
        self.pool = ConnectionPool(url, min_size=1, max_size=max(1, pool_max), open=False, timeout=timeout_s,
                                   kwargs={"autocommit": False, "connect_timeout": max(1, int(timeout_s))},
                                   name=f"heimdall-{schema}")
        self.pool.open(wait=False)
        # rendered once: the hot path executes a plain string, as a hand-written one would be
        self._insert_fix = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (fix_key, captured_at) DO NOTHING").format(
            self._predictions, sql.SQL(", ").join(map(sql.Identifier, FIX_COLUMNS)),
            sql.SQL(", ").join(map(sql.Placeholder, FIX_COLUMNS))).as_string()
        self._insert_rej = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self._rejections, sql.SQL(", ").join(map(sql.Identifier, REJECTION_COLUMNS)),
            sql.SQL(", ").join(map(sql.Placeholder, REJECTION_COLUMNS))).as_string()

    def _run(self, fn):
        """Run ``fn(conn)`` in one transaction: the pool commits on success, rolls back on error."""
        try:
            with self.pool.connection() as conn:
                return fn(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise TransientError(f"PostgreSQL unreachable: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL refused the operation: {exc}") from exc

    def init_schema(self) -> dict[str, Any]:
        def go(conn: psycopg.Connection) -> dict[str, Any]:
            conn.execute(sql.SQL(DDL).format(schema=self._schema))
            row = conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
            done = {"backend": "postgresql", "schema": self.schema, "timescaledb": False}
            if row:
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                table = sql.Literal(self._predictions.as_string(conn))
                for stmt in TIMESCALE.strip().split(";\n"):
                    conn.execute(sql.SQL(stmt).format(schema=self._schema, table=table))
                done["timescaledb"] = True
            return done

        return self._run(go)

    def write_fixes(self, rows: list[dict[str, Any]]) -> int:
        if not rows:
            return 0
        prepared = [{**r, "timings_ms": Jsonb(r["timings_ms"]), "fix": Jsonb(r["fix"])} for r in rows]

        def go(conn: psycopg.Connection) -> int:
            if len(prepared) == 1:  # a plain execute: executemany's pipeline costs ~0.4 ms per call
                return max(conn.execute(self._insert_fix, prepared[0]).rowcount, 0)
            with conn.cursor() as cur:
                cur.executemany(self._insert_fix, prepared)  # rowcount: the sum over the statements
                return max(cur.rowcount, 0)

        return self._run(go)

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._run(lambda conn: conn.cursor().executemany(self._insert_rej, rows))

    def count_rejections(self) -> int:
        return self._run(lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._rejections))
                         .fetchone()[0])

    def count_fixes(self) -> int:
        return self._run(lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._predictions))
                         .fetchone()[0])

    def fetch_fix(self, fix_key: str) -> dict[str, Any] | None:
        """The stored fix document for a request or task id (newest first)."""
        row = self._run(lambda conn: conn.execute(
            sql.SQL("SELECT fix FROM {} WHERE fix_key = %s ORDER BY captured_at DESC LIMIT 1").format(self._predictions),
            (fix_key,)).fetchone())
        return row[0] if row else None

    def drop_schema(self) -> None:
        """Remove the schema and everything in it (tests)."""
        self._run(lambda conn: conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(self._schema)))

    def close(self) -> None:
        self.pool.close()
