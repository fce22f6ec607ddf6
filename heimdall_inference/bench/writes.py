"""``bench --writes``: three ways to store a batch of fixes in the real ``predictions`` table, per row.

* **single**: one ``INSERT … ON CONFLICT DO NOTHING`` and one commit per row (a lone ``heimdall.predict``);
* **executemany**: the store's batch write, one transaction (psycopg 3 pipelines the statements): what
  micro-batches and chunks use;
* **copy**: ``COPY`` into a temporary staging table, then one ``INSERT … SELECT … ON CONFLICT DO NOTHING``
  into the table (the same idempotency), one transaction.

Each batch writes fresh keys into a schema of its own (dropped at the end), on whatever the database is:
a TimescaleDB hypertable where ``db init`` makes one. The fixes are real ones from the shipped model.
"""

from __future__ import annotations

import statistics
import time
import uuid
from typing import Any, Sequence

__all__ = ["bench_writes", "format_writes"]


def bench_writes(database_url: str, *, sizes: Sequence[int] = (1, 16, 64, 256, 1024), repeats: int = 7,
                 progress: Any = None) -> dict[str, Any]:
    """Median milliseconds per row of each method at each batch size; checks every row landed exactly once."""
    from psycopg import sql
    from psycopg.types.json import Jsonb

    from ..core.localizer import Localizer
    from ..lab.simulator import SignalConfig, scene_payloads, simulate
    from ..store import fix_row
    from ..store.base import FIX_COLUMNS
    from ..store.postgres import PostgresStore

    loc = Localizer()
    spec = loc.spec
    signal = SignalConfig(sample_rate_hz=spec.sample_rate_hz, snippet_s=spec.snippet_samples / spec.sample_rate_hz,
                          full_scale_dbm=spec.features.full_scale_dbm)
    scenes, iq = simulate(spec.network, 64, seed=3, signal=signal)
    fixes = loc.predict_many(scene_payloads(scenes, iq, spec.network, signal, seed=3))
    store = PostgresStore(database_url, schema=f"bench_writes_{uuid.uuid4().hex[:8]}", pool_max=1)
    info = store.init_schema()
    table = sql.Identifier(store.schema, "predictions")
    cols = sql.SQL(", ").join(map(sql.Identifier, FIX_COLUMNS))
    stage = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS heimdall_stage (LIKE {} INCLUDING DEFAULTS) "
                    "ON COMMIT DELETE ROWS").format(table)
    copy_in = sql.SQL("COPY heimdall_stage ({}) FROM STDIN").format(cols)
    move = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM heimdall_stage ON CONFLICT (fix_key, captured_at) "
                   "DO NOTHING").format(table, cols, cols)
    counter = [0]

    def rows(n: int) -> list[dict[str, Any]]:
        counter[0] += 1
        return [fix_row({**fixes[i % len(fixes)], "request_id": f"w{counter[0]}-{i}"}, f"d{i}") for i in range(n)]

    def single(rs: list[dict[str, Any]]) -> int:
        return sum(store.write_fixes([r]).new for r in rs)

    def many(rs: list[dict[str, Any]]) -> int:
        return store.write_fixes(rs).new

    def copy(rs: list[dict[str, Any]]) -> int:
        with store.pool.connection() as conn:
            conn.execute(stage)
            with conn.cursor() as cur:
                with cur.copy(copy_in) as cp:
                    for r in rs:
                        cp.write_row([Jsonb(r[c]) if c in ("timings_ms", "fix") else r[c] for c in FIX_COLUMNS])
                cur.execute(move)
                return cur.rowcount

    out: dict[str, Any] = {"timescaledb": info.get("timescaledb"), "ms_per_row": {}}
    try:
        for n in sizes:
            times: dict[str, list[float]] = {"single": [], "executemany": [], "copy": []}
            for _ in range(repeats):
                for name, fn in (("single", single), ("executemany", many), ("copy", copy)):
                    if name == "single" and n > 64:
                        continue  # a row per transaction is measured well enough on smaller batches
                    rs = rows(n)
                    t0 = time.perf_counter()
                    stored = fn(rs)
                    times[name].append((time.perf_counter() - t0) * 1e3 / n)
                    if stored != n or fn(rs[: min(n, 4)]) != 0:  # every row once, and a rewrite adds nothing
                        raise AssertionError(f"{name}: {stored} of {n} rows stored, or a rewrite stored again")
            out["ms_per_row"][n] = {k: round(statistics.median(v), 4) for k, v in times.items() if v}
            if progress:
                progress(f"writes: {n} rows {out['ms_per_row'][n]}")
        out["rows"] = store.count_fixes()
    finally:
        store.drop_schema()
        store.close()
    return out


def format_writes(r: dict[str, Any]) -> str:
    lines = [f"writes into predictions ({'TimescaleDB hypertable' if r['timescaledb'] else 'plain table'}), "
             "ms per row, median:", "batch | single | executemany | copy + insert"]
    for n, m in r["ms_per_row"].items():
        lines.append(f"{n:>5} | {m.get('single', float('nan')):>6.3f} | {m['executemany']:>11.4f} | {m['copy']:.4f}")
    return "\n".join(lines)
