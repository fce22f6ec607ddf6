"""``heimdall-inference bench --swap``: a model hot swap under open-loop load, measured.

A worker serves ``models:/localization_model@bench-swap`` (the shipped model registered twice in the
MLflow registry at ``MLFLOW_TRACKING_URI``, as versions A and B). Live fixes arrive as Poisson traffic
at half the measured peak; the alias is flipped A -> B and back to A, each flip followed by
``model reload``. Reported: tasks sent, fixes, failures, lost (rows against submissions), p99 before
the first flip and in the two seconds after each, and which version served each fix.
"""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..settings import Settings

__all__ = ["run_swap_bench", "format_swap_report"]

ALIAS = "bench-swap"


def _p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else float("nan")


def run_swap_bench(settings: Settings, *, workers: int = 2, phase_s: float = 5.0, seed: int = 17,
                   log_dir: Path | None = None, progress=print) -> dict[str, Any]:
    """Run the swap benchmark against ``settings``' servers and the registry at ``MLFLOW_TRACKING_URI``."""
    from ..client import submit
    from ..core.session import default_model_path
    from ..registry.mlflow_registry import MlflowRegistry
    from ..store import open_store
    from ..worker.celery_app import app, configure_app
    from ..worker.model_swap import RELOAD_COMMAND
    from ..worker.process import WorkerProcess
    from .service import BenchConfig, _closed_loop, _Payloads

    reg = MlflowRegistry()
    progress("registering the shipped model twice ...")
    a = reg.register(default_model_path())
    b = reg.register(default_model_path())
    reg.promote(a.version, ALIAS)
    run_id = f"swap-{uuid.uuid4().hex[:8]}"
    cache = Path(tempfile.mkdtemp(prefix="heimdall-swap-cache-"))
    wsettings = settings.replace(model_uri=f"models:/{a.name}@{ALIAS}", model_poll_s=0.0, model_cache_dir=str(cache))
    configure_app(wsettings)
    store = open_store(settings.database_url, schema=settings.db_schema)
    store.init_schema()
    fixes0 = store.count_fixes()
    payloads = _Payloads(BenchConfig(seed=seed, invalid_share=0.0), run_id)
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="heimdall-swap-"))
    worker = WorkerProcess(wsettings, log_dir / f"{run_id}-worker.log", concurrency=workers)
    out: list[tuple[float, float, str]] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        worker.wait_ready()
        for _ in range(20):
            submit(payloads.next(valid=True)).get(timeout=60)
        progress("peak: 10 closed-loop producers for 3 s ...")
        peak = _closed_loop(submit, lambda: payloads.next(valid=True), 10, 3.0)["throughput_per_s"]
        rate = 0.5 * peak
        progress(f"open loop at {rate:.0f}/s; flipping {ALIAS} {a.version} -> {b.version} -> {a.version} ...")
        pool = ThreadPoolExecutor(max_workers=256)
        rng = np.random.default_rng(seed)
        sent = 0

        def wait(res: Any, t0: float) -> None:
            try:
                fix = res.get(timeout=60)
                with lock:
                    out.append((t0, time.monotonic() - t0, str(fix["model"]["version"])))
            except Exception as exc:  # counted: the figure is "failed"
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

        flips: list[float] = []
        plan = [(phase_s, b.version), (2 * phase_s, a.version)]
        start = time.monotonic()
        next_t = start
        while next_t - start < 3 * phase_s:
            if plan and next_t - start >= plan[0][0]:
                _, version = plan.pop(0)
                reg.promote(version, ALIAS)
                app.control.broadcast(RELOAD_COMMAND, reply=False)
                flips.append(time.monotonic())
            now = time.monotonic()
            if next_t > now:
                time.sleep(next_t - now)
            t0 = time.monotonic()
            pool.submit(wait, submit(payloads.next(valid=True)), t0)
            sent += 1
            next_t += rng.exponential(1.0 / rate)
        pool.shutdown(wait=True)
    finally:
        worker.stop()
    deadline = time.monotonic() + 60
    want = payloads.count
    while store.count_fixes() - fixes0 < want and time.monotonic() < deadline:
        time.sleep(0.5)
    rows = store.count_fixes() - fixes0
    store.close()
    before = [d * 1e3 for t, d, _ in out if t < flips[0]] if flips else []
    during = [d * 1e3 for t, d, _ in out if any(f <= t < f + 2.0 for f in flips)]
    served = {}
    for _, _, v in sorted(out):
        served[v] = served.get(v, 0) + 1
    return {"run_id": run_id, "workers": workers, "rate_per_s": rate, "peak_per_s": peak, "sent": sent,
            "fixes": len(out), "failed": len(errors), "errors": errors[:5], "submitted": want, "rows": rows,
            "lost": want - rows, "p99_before_ms": _p99(before), "p99_during_ms": _p99(during),
            "p99_ratio": _p99(during) / _p99(before) if before else float("nan"),
            "versions": [a.version, b.version, a.version], "served_by_version": served,
            "worker_log": str(worker.log_path)}


def format_swap_report(r: dict[str, Any]) -> str:
    return "\n".join([
        f"heimdall model hot swap {r['run_id']}: {r['workers']} children, open loop at {r['rate_per_s']:.0f}/s "
        f"(half of {r['peak_per_s']:.0f}/s), alias flipped {' -> '.join(r['versions'])}",
        f"tasks {r['sent']}, fixes {r['fixes']}, failed {r['failed']}, lost {r['lost']} "
        f"({r['rows']} rows for {r['submitted']} submitted); fixes by version {r['served_by_version']}",
        f"p99 before the first flip {r['p99_before_ms']:.1f} ms; in the 2 s after each flip {r['p99_during_ms']:.1f} ms "
        f"-> {r['p99_ratio']:.2f}x (target < 2)"])
