"""PostgreSQL store: a ``predictions`` hypertable where TimescaleDB is used, the same table otherwise.

psycopg errors are translated here: connection-level failures (``OperationalError``, which includes
a statement cancelled by ``statement_timeout``, and pool timeouts) become :class:`TransientError`
(the task retries with backoff), the rest :class:`StorageError`. One pool per process (create it
after fork). Every connection carries a ``statement_timeout``, so a locked table fails a write (which
is retried) well before the task's time limit instead of holding a child until it is killed.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from msgspec.json import Encoder
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import ConfigError, StorageError, TransientError
from .base import (EXPORT_COLUMNS, FIX_COLUMNS, PAIR_COLUMNS, REJECTION_COLUMNS, SHADOW_COLUMNS, TIMESCALEDB_MODES, FixWrites,
                   other_payload)

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
    digest             text,
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
    size_bytes  integer,
    reject_key  text
);
CREATE TABLE IF NOT EXISTS {schema}.shadow_fixes (
    captured_at        timestamptz      NOT NULL,
    fix_key            text             NOT NULL,
    served_version     text             NOT NULL,
    model_name         text             NOT NULL,
    model_version      text             NOT NULL,
    model_alias        text,
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
    stored_at          timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (fix_key, captured_at, model_version)
);
ALTER TABLE {schema}.predictions ADD COLUMN IF NOT EXISTS digest text;
ALTER TABLE {schema}.predictions ADD COLUMN IF NOT EXISTS model_alias text;
ALTER TABLE {schema}.predictions ADD COLUMN IF NOT EXISTS quality_grade text;
ALTER TABLE {schema}.rejections ADD COLUMN IF NOT EXISTS reject_key text;
CREATE UNIQUE INDEX IF NOT EXISTS rejections_once_idx ON {schema}.rejections (reject_key, code);
"""
"""Creates the tables, and migrates tables made by an earlier version (the ADD COLUMNs)."""

# {table} is a table's name as a text literal (a regclass argument), {ident} the same as an Identifier; both
# tables (predictions, shadow_fixes) are hypertables on captured_at with the same policies.
TIMESCALE = """
SELECT create_hypertable({table}, 'captured_at', if_not_exists => TRUE, migrate_data => TRUE);
ALTER TABLE {ident} SET (timescaledb.compress, timescaledb.compress_segmentby = 'model_version');
SELECT add_compression_policy({table}, INTERVAL '7 days', if_not_exists => TRUE);
SELECT add_retention_policy({table}, INTERVAL '400 days', if_not_exists => TRUE);
"""

NOT_PRELOADED = ("TimescaleDB is installed but not preloaded: add timescaledb to shared_preload_libraries in "
                 "postgresql.conf and restart PostgreSQL")
NOT_INSTALLED = "TimescaleDB is not installed in this PostgreSQL server"


_json = Encoder().encode
"""JSON for the jsonb columns: msgspec's encoder, 8x the standard library's (1.5 against 12 us for a fix document)."""


class PostgresStore:
    """``predictions`` and ``rejections`` in one schema, through a small connection pool."""

    def __init__(self, url: str, *, schema: str = "public", pool_max: int = 4, timeout_s: float = 5.0,
                 statement_timeout_ms: int = 10_000) -> None:
        if not _IDENT.match(schema):  # quoting would make any name safe; this keeps names plain and portable
            raise ValueError(f"invalid schema name {schema!r}")
        self.schema = schema
        self._schema = sql.Identifier(schema)
        self._predictions = sql.Identifier(schema, "predictions")
        self._rejections = sql.Identifier(schema, "rejections")
        self._shadows = sql.Identifier(schema, "shadow_fixes")
        self.timeout_s = timeout_s
        options = f"-c statement_timeout={int(statement_timeout_ms)}"
        self.pool = ConnectionPool(url, min_size=1, max_size=max(1, pool_max), open=False, timeout=timeout_s,
                                   kwargs={"autocommit": False, "connect_timeout": max(1, int(timeout_s)),
                                           "options": options},
                                   name=f"heimdall-{schema}")
        self.pool.open(wait=False)
        # rendered once: the hot path executes a plain string, as a hand-written one would be
        self._insert_fix = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (fix_key, captured_at) DO NOTHING").format(
            self._predictions, sql.SQL(", ").join(map(sql.Identifier, FIX_COLUMNS)),
            sql.SQL(", ").join(map(sql.Placeholder, FIX_COLUMNS))).as_string()
        self._insert_rej = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (reject_key, code) DO NOTHING").format(
            self._rejections, sql.SQL(", ").join(map(sql.Identifier, REJECTION_COLUMNS)),
            sql.SQL(", ").join(map(sql.Placeholder, REJECTION_COLUMNS))).as_string()
        self._insert_shadow = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (fix_key, captured_at, model_version) DO NOTHING").format(
            self._shadows, sql.SQL(", ").join(map(sql.Identifier, SHADOW_COLUMNS)),
            sql.SQL(", ").join(map(sql.Placeholder, SHADOW_COLUMNS))).as_string()
        # the stored digests of a batch's keys (only asked when some rows were already there)
        self._stored_digests = sql.SQL(
            "SELECT p.fix_key, p.captured_at, p.digest FROM {} p JOIN unnest(%s::text[], %s::timestamptz[]) "
            "AS k(fix_key, captured_at) USING (fix_key, captured_at)").format(self._predictions).as_string()

    def _run(self, fn):
        """Run ``fn(conn)`` in one transaction: the pool commits on success, rolls back on error."""
        try:
            with self.pool.connection() as conn:
                return fn(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise TransientError(f"PostgreSQL unreachable or too slow: {_first_line(exc)}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL refused the operation: {_first_line(exc)}") from exc

    def init_schema(self, *, timescaledb: str = "auto") -> dict[str, Any]:
        """Create or migrate the tables; a hypertable with compression and retention where TimescaleDB
        is used. ``timescaledb``: "auto" uses it where it works and says why not otherwise, "on"
        requires it (ConfigError naming the fix), "off" never uses it."""
        if timescaledb not in TIMESCALEDB_MODES:
            raise ValueError(f"timescaledb must be one of {TIMESCALEDB_MODES}")

        def go(conn: psycopg.Connection) -> dict[str, Any]:
            conn.execute("SET LOCAL statement_timeout = 0")  # migrating data into a hypertable may take a while
            conn.execute(sql.SQL(DDL).format(schema=self._schema))
            done: dict[str, Any] = {"backend": "postgresql", "schema": self.schema, "timescaledb": False}
            if timescaledb == "off":
                return done
            why = self._timescaledb_problem(conn)
            if why is not None:
                if timescaledb == "on":
                    raise ConfigError(f"{why} (HEIMDALL_TIMESCALEDB=on); or set HEIMDALL_TIMESCALEDB=auto to "
                                      "use a plain table")
                done["timescaledb_note"] = f"{why}; using a plain table"
                return done
            for ident in (self._predictions, self._shadows):
                table = sql.Literal(ident.as_string(conn))
                for stmt in TIMESCALE.strip().split(";\n"):
                    conn.execute(sql.SQL(stmt).format(ident=ident, table=table))
            done["timescaledb"] = True
            return done

        return self._run(go)

    @staticmethod
    def _timescaledb_problem(conn: psycopg.Connection) -> str | None:
        """Why TimescaleDB cannot be used in this database, or None once the extension is created."""
        if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone() is None:
            return NOT_INSTALLED
        preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
        if "timescaledb" not in preload:
            return NOT_PRELOADED
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the tables above in place
                conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        except psycopg.errors.InsufficientPrivilege as exc:
            return f"TimescaleDB cannot be created by this user ({_first_line(exc)}): run CREATE EXTENSION " \
                   "timescaledb as a superuser once"
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            return f"CREATE EXTENSION timescaledb failed: {_first_line(exc)}"
        return None

    def write_fixes(self, rows: list[dict[str, Any]], shadows: list[dict[str, Any] | None] | None = None) -> FixWrites:
        if not rows:
            return FixWrites(0)
        prepared = [{**r, "timings_ms": Jsonb(r["timings_ms"], dumps=_json), "fix": Jsonb(r["fix"], dumps=_json)}
                    for r in rows]

        def go(conn: psycopg.Connection) -> FixWrites:
            if len(prepared) == 1:  # a plain execute: executemany's pipeline costs ~0.4 ms per call
                new = max(conn.execute(self._insert_fix, prepared[0]).rowcount, 0)
            else:
                with conn.cursor() as cur:
                    cur.executemany(self._insert_fix, prepared)  # rowcount: the sum over the statements
                    new = max(cur.rowcount, 0)
            done = FixWrites(new) if new == len(rows) or not any(r.get("digest") for r in rows) else \
                FixWrites(new, self._conflicts(conn, rows))
            beside = [s for i, s in enumerate(shadows or ()) if s is not None and i not in done.conflicts]
            if beside:
                try:
                    with conn.transaction():  # a savepoint: a refused shadow row never takes the fixes with it
                        conn.cursor().executemany(self._insert_shadow, beside)
                except psycopg.OperationalError:
                    raise
                except psycopg.Error as exc:
                    return FixWrites(done.new, done.conflicts, f"PostgreSQL refused the shadow rows: {_first_line(exc)}")
            return done

        return self._run(go)

    def _conflicts(self, conn: psycopg.Connection, rows: list[dict[str, Any]]) -> frozenset[int]:
        """Rows whose (key, capture time) is stored with another payload digest (same transaction)."""
        asked = [r for r in rows if r.get("digest")]
        stored = {(k, t): d for k, t, d in conn.execute(self._stored_digests, (
            [r["fix_key"] for r in asked], [r["captured_at"] for r in asked])).fetchall()}
        out = set()
        for i, r in enumerate(rows):
            d = stored.get((r["fix_key"], datetime.fromisoformat(r["captured_at"])))
            if other_payload(d, r.get("digest")):
                out.add(i)
        return frozenset(out)

    def write_rejections(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self._run(lambda conn: conn.cursor().executemany(self._insert_rej, rows))

    def count_rejections(self) -> int:
        return self._run(lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._rejections))
                         .fetchone()[0])

    def count_fixes(self) -> int:
        return self._run(lambda conn: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._predictions))
                         .fetchone()[0])

    def shadow_pairs(self, since: str | None = None, limit: int = 1_000_000) -> list[dict[str, Any]]:
        cols = sql.SQL(", ").join([sql.SQL("p.{} AS {}").format(sql.Identifier(c.removeprefix("served_")),
                                                                 sql.Identifier(c)) for c in PAIR_COLUMNS[:8]] +
                                  [sql.SQL("s.{} AS {}").format(sql.Identifier(c.removeprefix("shadow_")),
                                                                sql.Identifier(c)) for c in PAIR_COLUMNS[8:]])
        query = sql.SQL("SELECT {} FROM {} p JOIN {} s USING (fix_key, captured_at) WHERE p.captured_at >= %s "
                        "ORDER BY p.captured_at DESC LIMIT %s").format(cols, self._predictions, self._shadows)
        return self._run(lambda conn: [dict(zip(PAIR_COLUMNS, r)) for r in conn.execute(
            query, (since or "-infinity", int(limit))).fetchall()])

    def recent_fixes(self, since: str | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        query = sql.SQL("SELECT {} FROM {} WHERE captured_at >= %s ORDER BY captured_at DESC LIMIT %s").format(
            sql.SQL(", ").join(map(sql.Identifier, EXPORT_COLUMNS)), self._predictions)
        rows = self._run(lambda conn: conn.execute(query, (since or "-infinity", int(limit))).fetchall())
        out = [dict(zip(EXPORT_COLUMNS, r)) for r in rows]
        for r in out:
            r["captured_at"] = r["captured_at"].isoformat()
        return out

    def arm_counts(self, since: str | None = None) -> list[dict[str, Any]]:
        query = sql.SQL("SELECT model_version, model_alias, count(*) FROM {} WHERE captured_at >= %s "
                        "GROUP BY 1, 2 ORDER BY 1, 2").format(self._predictions)
        return self._run(lambda conn: [{"model_version": v, "model_alias": a, "fixes": n} for v, a, n in
                                       conn.execute(query, (since or "-infinity",)).fetchall()])

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


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
