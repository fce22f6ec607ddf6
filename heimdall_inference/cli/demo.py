"""The embedded default: the real service on this machine alone, with no servers.

A real ``celery -A heimdall_inference.worker worker`` process (prefork) runs on kombu's filesystem
transport, with Celery's file result backend and a SQLite ``predictions`` table, all in one data
folder. Simulated transmissions on both bands of the network (2 m, and a quarter as many on 70 cm, which
the worker routes to its 70 cm model) are submitted as single ``heimdall.predict`` tasks, and 2 m ones as
one batch chord; the demo prints true vs predicted positions and the model used, and writes the map picture.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..settings import Settings
from ..worker.celery_app import configure_app
from ..worker.process import WorkerProcess

__all__ = ["run_demo"]


def run_demo(*, count: int = 8, batch: int = 64, seed: int = 42, plot: Path | None = None,
             model: Path | None = None, data_dir: Path | None = None, out=print) -> dict[str, Any]:
    """Start a worker on the embedded transport, submit tasks and a chord, report; returns figures."""
    from ..client import predict_batch, submit
    from ..core.network import reference_network
    from ..lab.simulator import Priors, SignalConfig, scene_payloads, simulate
    from ..store import open_store
    from ..core.fix import covers

    d = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="heimdall-embedded-"))
    settings = Settings.embedded(d, model_path=str(model or ""))
    store = open_store(settings.database_url)
    store.init_schema()
    configure_app(settings)
    t0 = time.perf_counter()
    worker = WorkerProcess(settings, d / "worker.log")
    try:
        worker.wait_ready()
        ready_s = time.perf_counter() - t0
        out(f"embedded worker ready in {ready_s:.1f} s (filesystem broker, file results, SQLite) in {d}")
        net = reference_network()
        signal = SignalConfig()
        prefix = f"demo-{uuid.uuid4().hex[:6]}"
        truths, docs = [], []
        for band, n in (("2m", count), ("70cm", max(1, count // 4))):
            scenes, iq = simulate(net, n, seed, priors=Priors.nominal(band))
            docs += scene_payloads(scenes, iq, net, signal, seed=seed, request_prefix=f"{prefix}-{band}")
            truths += [scenes.truth(i, net) for i in range(n)]
        t1 = time.perf_counter()
        results = [submit(doc) for doc in docs]
        fixes = [r.get(timeout=60) for r in results]
        single_s = time.perf_counter() - t1
        out(f"\n{len(docs)} heimdall.predict tasks in {single_s:.2f} s\n")
        out(f"{'#':>2} {'MHz':>5} {'rx':>2} {'true lat':>9} {'true lon':>9} {'fix lat':>9} {'fix lon':>9} {'error km':>8} "
            f"{'95% ellipse km':>15}  inside95  quality  model")
        errors, inside = [], []
        for i, (fix, t) in enumerate(zip(fixes, truths)):
            e = float(np.hypot(t["east_m"] - fix["position"]["east_m"], t["north_m"] - fix["position"]["north_m"]) / 1e3)
            ok = covers(fix, t["east_m"], t["north_m"], 0.95)
            errors.append(e)
            inside.append(ok)
            el = fix["uncertainty"]["ellipses"][-1]
            out(f"{i:>2} {t['center_freq_hz'] / 1e6:>5.1f} {len(t['online']):>2} {t['lat']:>9.4f} {t['lon']:>9.4f} "
                f"{fix['position']['lat']:>9.4f} {fix['position']['lon']:>9.4f} {e:>8.1f} "
                f"{el['semi_major_m'] / 1e3:>6.1f} x {el['semi_minor_m'] / 1e3:>5.1f}  {'yes' if ok else 'no ':<8} "
                f"{fix['quality']['grade']:<7}  {fix['model']['name']} v{fix['model']['version']}")
        out(f"median error {np.median(errors):.1f} km; {sum(inside)}/{len(inside)} inside their 95 % ellipse")
        bscenes, biq = simulate(net, batch, seed + 1)
        bdocs = scene_payloads(bscenes, biq, net, signal, seed=seed + 1, request_prefix=None)
        before = store.count_fixes()
        t2 = time.perf_counter()
        summary = predict_batch(bdocs, chunk_size=16, timeout_s=120)
        batch_s = time.perf_counter() - t2
        rows = store.count_fixes() - before
        out(f"\nbatch chord: {summary['payloads']} payloads in {summary['chunks']} chunks -> {summary['fixes']} fixes, "
            f"{summary['errors']} errors, {rows} new rows in {settings.database_url} ({batch_s:.2f} s)")
        if plot:
            from .plot import plot_fixes

            plot_fixes(net, fixes, plot, truths=truths, title=f"heimdall embedded demo: {len(fixes)} fixes")
            out(f"map written to {plot}")
        return {"ready_s": ready_s, "errors_km": errors, "inside95": inside, "batch": summary, "rows": rows,
                "data_dir": str(d), "models": [f["model"]["name"] for f in fixes]}
    finally:
        worker.stop()
        store.close()
