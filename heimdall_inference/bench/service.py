"""Service benchmark over the configured broker and backend, reported as ratios measured in one run.

Phases (each bounded in time and count; loopback servers only):

1. the in-process pipeline with as many processes as worker children (the limit);
2. ``heimdall.noop`` and ``heimdall.predict`` bursts (publish N, wait for all): single-task
   throughput against Celery's own floor on the same broker and backend;
3. closed loop: C producers (threads) each submitting and waiting: throughput, p50/p95/p99, errors;
4. open loop: Poisson arrivals at fractions of the measured peak: latency percentiles, and whether
   the backlog stays bounded (late latencies no worse than early ones);
5. batch: ``predict_batch`` as a chord of chunks over many payloads: fixes/s until every row is in
   the database;
5b. live during a batch: open-loop live fixes at a fraction of the peak, first alone (idle), then while
   a large batch (10,000 payloads) runs on the batch queue: the live p95 against the idle p95;
6. where a task's time goes (from the ``timings_ms`` every fix carries) and broker bytes per fix
   for JSON/base64 vs msgpack bodies.

Every submitted payload is accounted for: rows in ``predictions`` plus rows in ``rejections`` must
equal what was submitted (a small share of payloads is deliberately invalid).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..ops.metrics import STAGES
from ..settings import Settings

__all__ = ["BenchConfig", "run_service_bench", "format_report"]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes and durations of the phases; ``quick()`` fits in under two minutes."""

    workers: int = 2  #: worker children (and in-process processes for the limit)
    unique_payloads: int = 256  #: distinct simulated transmissions
    repeat_share: float = 0.2  #: share of submissions that repeat an earlier payload (cache hits)
    invalid_share: float = 0.01  #: share of deliberately invalid payloads (accounting)
    burst: int = 2000  #: tasks per throughput burst (noop, noop with a payload, predict)
    publishers: tuple[int, ...] = (1, 4, 8)  #: producer threads per burst; each kind is rated at its best
    closed_levels: tuple[int, ...] = (1, 10, 100)
    closed_s: float = 10.0  #: seconds per closed-loop level
    open_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    open_s: float = 10.0  #: seconds per open-loop level
    batch_payloads: int = 10_000
    chunk_size: int = 64  #: the client's default
    live_batch_payloads: int = 10_000  #: the batch that runs while live fixes are measured
    live_fraction: float = 0.25  #: live arrival rate during that batch, as a fraction of the peak
    live_idle_s: float = 10.0  #: seconds of the same live load alone (the idle p95)
    inprocess_s: float = 5.0
    seed: int = 17
    batch_max: int = 32  #: HEIMDALL_BATCH_MAX of the started worker (1: no micro-batching)

    @classmethod
    def quick(cls, **kw: Any) -> "BenchConfig":
        base = dict(burst=400, closed_s=3.0, open_s=3.0, batch_payloads=1000, inprocess_s=2.0,
                    live_batch_payloads=5000, live_idle_s=5.0)
        return cls(**{**base, **kw})

    @classmethod
    def tiny(cls, **kw: Any) -> "BenchConfig":
        base = dict(unique_payloads=24, burst=40, publishers=(1, 2), closed_levels=(1, 4), closed_s=0.5, open_fractions=(0.5,),
                    open_s=0.5, batch_payloads=64, chunk_size=16, inprocess_s=0.3, invalid_share=0.05,
                    live_batch_payloads=128, live_idle_s=0.5)
        return cls(**{**base, **kw})


class _Payloads:
    """A pool of payloads: unique transmissions, repeats (same IQ, new request id), a few invalid ones."""

    def __init__(self, cfg: BenchConfig, run_id: str) -> None:
        from ..core.network import reference_network
        from ..lab.simulator import SignalConfig, scene_payloads, simulate

        net = reference_network()
        scenes, iq = simulate(net, cfg.unique_payloads, cfg.seed)
        self.json_docs = scene_payloads(scenes, iq, net, SignalConfig(), seed=cfg.seed, request_prefix=None)
        self.bin_docs = scene_payloads(scenes, iq, net, SignalConfig(), seed=cfg.seed, request_prefix=None,
                                       binary=True)
        self.rng = np.random.default_rng(cfg.seed)
        self.cfg = cfg
        self.run_id = run_id
        self.count = 0
        self.invalid = 0
        self._lock = threading.Lock()

    def sample(self) -> dict[str, Any]:
        """A valid payload for a task that ignores it (not counted: it never reaches the database)."""
        with self._lock:
            i = int(self.rng.integers(0, len(self.bin_docs)))
        return self.bin_docs[i]

    def next(self, *, valid: bool = False, invalid: bool = False) -> dict[str, Any]:
        """The next submission: random (repeats and invalid ones in their shares), ``valid`` never invalid,
        ``invalid`` always (too few receivers: a recorded rejection)."""
        with self._lock:
            self.count += 1
            n = self.count
            r = -1.0 if invalid else max(self.rng.random(), self.cfg.invalid_share if valid else 0.0)
            i = int(self.rng.integers(0, len(self.bin_docs)))
        doc = dict(self.bin_docs[i])
        doc["request_id"] = f"{self.run_id}-{n}"
        if r < self.cfg.invalid_share:
            doc["receivers"] = doc["receivers"][:2]  # too few receivers: a recorded rejection
            with self._lock:
                self.invalid += 1
        elif r > self.cfg.invalid_share + self.cfg.repeat_share:
            doc["options"] = {"cache": False}  # unique work; the rest may hit the cache
        return doc


def _percentiles(lat_s: list[float]) -> dict[str, float]:
    if not lat_s:
        return {"p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan}
    a = np.asarray(lat_s) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99))}


def _inprocess_worker(args: tuple) -> tuple[int, float, float]:
    seconds, seed, model = args
    from .inprocess import make_payloads
    from ..core.localizer import Localizer
    from ..ops.cpu import one_thread_per_process

    one_thread_per_process()  # one process per core, as the worker's children

    loc = Localizer(model or None)
    raw = make_payloads(loc, 128, seed)
    loc.predict_many(raw[:8])
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        loc.predict_many(raw)
        n += len(raw)
    return n, time.perf_counter() - t0, time.process_time() - c0


def inprocess_limit(processes: int, seconds: float, seed: int, model: str = "") -> tuple[float, float]:
    """Fixes/s of the in-process pipeline (batches of 128) on ``processes`` processes at once, and
    the CPU milliseconds one fix costs there."""
    with get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_inprocess_worker, [(seconds, seed + k, model) for k in range(processes)])
    fixes = sum(n for n, _, _ in parts)
    return fixes / max(t for _, t, _ in parts), sum(c for _, _, c in parts) * 1e3 / max(1, fixes)


def _burst(publish, n: int, publishers: int) -> tuple[float, int]:
    """Publish n tasks from ``publishers`` threads, wait for all; tasks/s and unexpected errors.

    One publisher is bounded by its own publish-confirm round trips, not by the service; several
    show what the broker, backend and workers can take."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=publishers) as ex:
        results = list(ex.map(lambda _: publish(), range(n)))
    errors = 0
    for r in results:
        try:
            r.get(timeout=120)
        except Exception as exc:
            if getattr(exc, "code", None) != "too_few_receivers":
                errors += 1
    return n / (time.perf_counter() - t0), errors


def _closed_loop(submit, next_doc, producers: int, seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    timings: list[dict[str, float]] = []
    sizes: list[int] = []
    errors = 0
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def producer() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            doc = next_doc()
            t0 = time.perf_counter()
            try:
                fix = submit(doc).get(timeout=60)
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    if isinstance(fix, dict):
                        timings.append(fix.get("timings_ms", {}))
                        sizes.append(fix.get("batch_size", 1))
            except Exception as exc:  # PayloadError for the deliberately invalid share
                with lock:
                    if getattr(exc, "code", None) != "too_few_receivers":
                        errors += 1
    t0 = time.perf_counter()
    threads = [threading.Thread(target=producer, daemon=True) for _ in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return {"producers": producers, "fixes": len(lat), "throughput_per_s": len(lat) / elapsed, "errors": errors,
            "error_rate": errors / max(1, len(lat) + errors), **_percentiles(lat),
            "mean_batch_size": float(np.mean(sizes)) if sizes else math.nan, "_timings": timings}


def _open_loop(submit, payloads: _Payloads, rate_per_s: float, seconds: float, seed: int,
               until=lambda: False) -> dict[str, Any]:
    """Poisson arrivals at ``rate_per_s`` for ``seconds`` (or until ``until()``); latency of each fix."""
    rng = np.random.default_rng(seed)
    lat: list[tuple[float, float]] = []
    errors = 0
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=256)

    def wait(res, t_pub: float) -> None:
        nonlocal errors
        try:
            res.get(timeout=60)
            with lock:
                lat.append((t_pub, time.perf_counter() - t_pub))
        except Exception as exc:
            with lock:
                if getattr(exc, "code", None) != "too_few_receivers":
                    errors += 1

    start = time.perf_counter()
    next_t = start
    sent = 0
    while next_t - start < seconds and not until():
        now = time.perf_counter()
        if next_t > now:
            time.sleep(next_t - now)
        doc = payloads.next()
        t_pub = time.perf_counter()
        pool.submit(wait, submit(doc), t_pub)
        sent += 1
        next_t += rng.exponential(1.0 / rate_per_s)
    pool.shutdown(wait=True)
    lat.sort()
    seconds = min(seconds, next_t - start)
    half = [d for t, d in lat if t - start < seconds / 2]
    late = [d for t, d in lat if t - start >= seconds / 2]
    p_early, p_late = _percentiles(half), _percentiles(late)
    bounded = bool(late) and (p_late["p95_ms"] <= max(2.0 * p_early["p95_ms"], p_early["p95_ms"] + 20.0))
    return {"target_rate_per_s": rate_per_s, "sent": sent, "fixes": len(lat), "errors": errors,
            **_percentiles([d for _, d in lat]), "p95_first_half_ms": p_early["p95_ms"],
            "p95_second_half_ms": p_late["p95_ms"], "queue_bounded": bounded}


def _batch_job(settings: Settings, cfg: BenchConfig, run_id: str, n: int, ready: Any, out: Any) -> None:
    """A batch job in a process of its own (as a deployment's batch producer is): its own payloads, one chord.
    Says ``ready`` once its payloads are made, then publishes and waits; puts its figures on ``out``."""
    from ..client import predict_batch
    from ..worker.celery_app import configure_app

    configure_app(settings)
    payloads = _Payloads(cfg, run_id)
    docs = [payloads.next() for _ in range(n)]
    ready.set()
    t0 = time.perf_counter()
    summary = predict_batch(docs, chunk_size=cfg.chunk_size, timeout_s=600)
    out.put({"summary": summary, "seconds": time.perf_counter() - t0, "submitted": payloads.count,
             "invalid": payloads.invalid})


def _live_during_batch(submit, settings: Settings, cfg: BenchConfig, run_id: str, payloads: _Payloads,
                       rate_per_s: float) -> dict[str, Any]:
    """The same open-loop live load alone, then while a large chord runs; the chord is published by another
    process (a producer in this one would share its interpreter lock with the live producer)."""
    idle = _open_loop(submit, payloads, rate_per_s, cfg.live_idle_s, cfg.seed + 100)
    ctx = get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    job = ctx.Process(target=_batch_job, args=(settings, cfg, f"{run_id}-batch", cfg.live_batch_payloads, ready, out))
    job.start()
    try:
        if not ready.wait(timeout=300):
            raise RuntimeError("the batch job did not get ready in 300 s")
        during = _open_loop(submit, payloads, rate_per_s, 600.0, cfg.seed + 101,
                            until=lambda: not out.empty() or not job.is_alive())
        res = out.get(timeout=600)
    finally:
        job.join(timeout=60)
        if job.is_alive():
            job.terminate()
    summary = res["summary"]
    keys = ("sent", "fixes", "errors", "p50_ms", "p95_ms", "p99_ms")
    return {"rate_per_s": rate_per_s, "idle": {k: idle[k] for k in keys}, "during": {k: during[k] for k in keys},
            "batch_submitted": res["submitted"], "batch_invalid": res["invalid"], "batch_seconds": res["seconds"],
            "batch_fixes": summary["fixes"], "batch_errors": summary["errors"],
            "batch_fixes_per_s": summary["fixes"] / res["seconds"],
            "p95_during_over_idle": during["p95_ms"] / idle["p95_ms"] if idle["p95_ms"] > 0 else math.nan}


def _message_bytes(payloads: _Payloads) -> dict[str, float]:
    from kombu.serialization import dumps

    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    j = [len(dumps([[d], {}, embed], "json")[2]) for d in payloads.json_docs[:64]]
    m = [len(dumps([[d], {}, embed], "msgpack")[2]) for d in payloads.bin_docs[:64]]
    return {"json_base64_bytes_per_fix": float(np.mean(j)), "msgpack_bytes_per_fix": float(np.mean(m)),
            "msgpack_over_json": float(np.mean(m) / np.mean(j))}


def run_service_bench(settings: Settings, cfg: BenchConfig, *, start_worker: bool = True,
                      log_dir: Path | None = None, model: str = "", progress=print) -> dict[str, Any]:
    """Run every phase against ``settings``' broker/backend/database; returns the report dict."""
    from ..client import submit
    from .cpu_meter import CpuMeter
    from ..worker.celery_app import configure_app
    from ..worker.process import WorkerProcess
    from ..store import open_store
    from ..worker.tasks import noop

    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    configure_app(settings)
    store = open_store(settings.database_url, schema=settings.db_schema)
    store.init_schema()
    fixes0, rej0 = store.count_fixes(), store.count_rejections()
    payloads = _Payloads(cfg, run_id)
    report: dict[str, Any] = {"run_id": run_id, "workers": cfg.workers, "broker": settings.broker_url.split("@")[-1],
                              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    worker = None
    log_dir = Path(log_dir or Path.cwd())
    try:
        progress(f"in-process limit on {cfg.workers} processes ...")
        report["inprocess_fixes_per_s"], report["inprocess_cpu_ms_per_fix"] = inprocess_limit(
            cfg.workers, cfg.inprocess_s, cfg.seed, model)
        if start_worker:
            t0 = time.perf_counter()
            env = {"HEIMDALL_BATCH_MAX": str(cfg.batch_max), **({"HEIMDALL_MODEL_PATH": model} if model else {})}
            worker = WorkerProcess(settings, log_dir / f"{run_id}-worker.log", concurrency=cfg.workers, extra_env=env)
            worker.wait_ready()
            report["worker_ready_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            submit(payloads.next(valid=True)).get(timeout=60)
            report["cold_start_to_first_fix_s"] = time.perf_counter() - t0
            report["first_fix_after_ready_s"] = time.perf_counter() - t1
        for _ in range(20):  # warm every child
            submit(payloads.next(valid=True)).get(timeout=60)
        progress("throughput bursts (noop, noop with a payload, predict) ...")
        meter = CpuMeter(worker.proc.pid if worker is not None else None)
        cpu: dict[str, Any] = {}

        def metered(fn, tasks: int) -> tuple[Any, dict[str, Any]]:
            """fn's result and the CPU per task each process group spent while it ran."""
            before = meter.sample()
            out = fn()
            return out, meter.per_task(before, meter.sample(), tasks)

        kinds = {"noop": lambda: noop.apply_async((None,)),
                 "noop_payload": lambda: noop.apply_async((payloads.sample(),), serializer="msgpack",
                                                          argsrepr="(<payload>,)"),
                 "predict": lambda: submit(payloads.next())}
        report["bursts"] = []
        for k in cfg.publishers:
            row: dict[str, Any] = {"publishers": k}
            for kind, publish in kinds.items():
                (row[f"{kind}_per_s"], row[f"{kind}_errors"]), row[f"{kind}_cpu"] = metered(
                    lambda: _burst(publish, cfg.burst, k), cfg.burst)
            report["bursts"].append(row)
        for kind in kinds:  # each at the publisher count that suits it best
            best = max(report["bursts"], key=lambda r: r[f"{kind}_per_s"])
            report[f"{kind}_per_s"] = best[f"{kind}_per_s"]
            cpu[kind] = {"publishers": best["publishers"], **best[f"{kind}_cpu"]}
        report["predict_burst_errors"] = sum(r["predict_errors"] for r in report["bursts"])
        # a burst of invalid payloads at predict's publisher count: what a rejection costs the worker beside a fix
        k = cpu["predict"]["publishers"]
        (report["reject_per_s"], report["reject_errors"]), reject_cpu = metered(
            lambda: _burst(lambda: submit(payloads.next(invalid=True)), cfg.burst, k), cfg.burst)
        cpu["reject"] = {"publishers": k, **reject_cpu}
        report["cpu"] = cpu
        report["closed_loop"] = []
        timings: list[dict[str, float]] = []
        for c in cfg.closed_levels:
            progress(f"closed loop, {c} producers ...")
            res = _closed_loop(submit, payloads.next, c, cfg.closed_s)
            timings.extend(res.pop("_timings"))
            report["closed_loop"].append(res)
        c = max(cfg.closed_levels)
        progress(f"closed loop, {c} producers of heimdall.noop (the floor's latency) ...")
        report["closed_loop_noop"] = _closed_loop(lambda _: noop.apply_async((None,)), lambda: None, c, cfg.closed_s)
        report["closed_loop_noop"].pop("_timings")
        peak = max([report["predict_per_s"]] + [r["throughput_per_s"] for r in report["closed_loop"]])
        report["peak_per_s"] = peak
        report["open_loop"] = []
        for k, frac in enumerate(cfg.open_fractions):
            progress(f"open loop at {int(frac * 100)} % of peak ({frac * peak:.0f}/s) ...")
            report["open_loop"].append({"fraction_of_peak": frac,
                                        **_open_loop(submit, payloads, frac * peak, cfg.open_s, cfg.seed + k)})
        progress(f"batch chord over {cfg.batch_payloads} payloads ...")
        docs = [payloads.next() for _ in range(cfg.batch_payloads)]
        before = store.count_fixes()
        t0 = time.perf_counter()
        from ..client import predict_batch as client_batch

        summary, cpu["batch"] = metered(lambda: client_batch(docs, chunk_size=cfg.chunk_size, timeout_s=600),
                                        cfg.batch_payloads)
        batch_s = time.perf_counter() - t0
        report["batch"] = {"payloads": cfg.batch_payloads, "chunk_size": cfg.chunk_size, "seconds": batch_s,
                           "fixes": summary["fixes"], "errors": summary["errors"],
                           "rows": store.count_fixes() - before,
                           "fixes_per_s": summary["fixes"] / batch_s,
                           "child_ms_per_chunk": {k: v / max(1, summary["chunks"])
                                                  for k, v in summary.get("timings_ms", {}).items()}}
        if cfg.live_batch_payloads > 0:
            rate = cfg.live_fraction * peak
            progress(f"live fixes at {rate:.0f}/s alone, then during a {cfg.live_batch_payloads}-payload batch ...")
            report["live_during_batch"] = {"payloads": cfg.live_batch_payloads,
                                           **_live_during_batch(submit, settings, cfg, run_id, payloads, rate)}
        report["split_ms"] = {k: float(np.mean([t.get(k, 0.0) for t in timings]))
                              for k in STAGES} if timings else {}
        report["message_bytes"] = _message_bytes(payloads)
        report["ratios"] = {
            "single_over_noop": report["predict_per_s"] / report["noop_per_s"],
            "single_over_noop_payload": report["predict_per_s"] / report["noop_payload_per_s"],
            "batch_over_inprocess": report["batch"]["fixes_per_s"] / report["inprocess_fixes_per_s"],
        }
        report["worker_efficiency"] = worker_efficiency(cpu, report["inprocess_cpu_ms_per_fix"])
    finally:
        if worker is not None:
            worker.stop()
    lb = report.get("live_during_batch", {})
    submitted = payloads.count + lb.get("batch_submitted", 0)
    fixes, rejected = store.count_fixes() - fixes0, store.count_rejections() - rej0
    report["accounting"] = {"submitted": submitted, "fix_rows": fixes, "rejection_rows": rejected,
                            "invalid_sent": payloads.invalid + lb.get("batch_invalid", 0),
                            "lost": submitted - fixes - rejected}
    store.close()
    return report


def worker_efficiency(cpu: dict[str, Any], inprocess_cpu_ms: float) -> dict[str, Any]:
    """What a worker's own host pays per fix, when the producers and the broker live elsewhere: the CPU of the worker's
    main process and its children per task in each metered phase, and the in-process pipeline's CPU per fix over that
    (1 would be a worker that costs nothing beyond the pipeline)."""
    out: dict[str, Any] = {}
    for phase, c in cpu.items():
        ms = c["cpu_ms_per_task"]
        worker_ms = ms.get("worker_main", 0.0) + ms.get("worker_children", 0.0)
        out[phase] = {"worker_main_ms": ms.get("worker_main", 0.0), "worker_children_ms": ms.get("worker_children", 0.0),
                      "worker_ms": round(worker_ms, 3),
                      "efficiency": round(inprocess_cpu_ms / worker_ms, 3) if worker_ms > 0 and phase != "reject"
                      else None}  # a rejection computes no fix
    return out


def format_report(r: dict[str, Any]) -> str:
    c = r.get("config", {})
    pool = f"{r['workers']} prefork children, micro-batches of up to {c.get('batch_max')}"
    lines = [f"heimdall service benchmark {r['run_id']}: {pool}, broker {r['broker']}"]
    if "worker_ready_s" in r:
        lines.append(f"worker ready {r['worker_ready_s']:.2f} s; cold start to first fix {r['cold_start_to_first_fix_s']:.2f} s")
    lines.append(f"in-process limit ({r['workers']} processes): {r['inprocess_fixes_per_s']:.0f} fixes/s")
    lines.append(f"{'publishers':>12} {'noop/s':>8} {'noop+payload/s':>15} {'predict/s':>10}")
    for b in r.get("bursts", []):
        lines.append(f"{b['publishers']:>12} {b['noop_per_s']:>8.0f} {b['noop_payload_per_s']:>15.0f} "
                     f"{b['predict_per_s']:>10.0f}")
    lines.append(f"noop floor {r['noop_per_s']:.0f} tasks/s; heimdall.predict {r['predict_per_s']:.0f} fixes/s "
                 f"-> ratio {r['ratios']['single_over_noop']:.2f} (target >= 0.9)")
    lines.append(f"noop carrying the same payloads {r['noop_payload_per_s']:.0f} tasks/s -> predict / that "
                 f"{r['ratios']['single_over_noop_payload']:.2f} (target >= 1.2)")
    if "reject_per_s" in r:
        lines.append(f"invalid payloads (too few receivers), {r['cpu']['reject']['publishers']} publishers: "
                     f"{r['reject_per_s']:.0f} rejections/s, {r['reject_errors']} unexpected errors")
    lines.append(f"{'closed loop':>12} {'fixes/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} errors batch")
    for c in r["closed_loop"]:
        lines.append(f"{c['producers']:>12} {c['throughput_per_s']:>8.0f} {c['p50_ms']:>7.1f} {c['p95_ms']:>7.1f} "
                     f"{c['p99_ms']:>7.1f} {c['errors']:>6} {c.get('mean_batch_size', math.nan):>5.1f}")
    if r.get("closed_loop_noop"):
        c = r["closed_loop_noop"]
        lines.append(f"{str(c['producers']) + ' noop':>12} {c['throughput_per_s']:>8.0f} {c['p50_ms']:>7.1f} "
                     f"{c['p95_ms']:>7.1f} {c['p99_ms']:>7.1f} {c['errors']:>6}   (Celery's floor)")
    lines.append(f"{'open loop':>12} {'rate/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} bounded")
    for o in r["open_loop"]:
        lines.append(f"{int(o['fraction_of_peak'] * 100):>11}% {o['target_rate_per_s']:>8.0f} {o['p50_ms']:>7.1f} "
                     f"{o['p95_ms']:>7.1f} {o['p99_ms']:>7.1f} {o['queue_bounded']}")
    b = r["batch"]
    lines.append(f"batch chord: {b['payloads']} payloads in chunks of {b['chunk_size']}: {b['fixes_per_s']:.0f} fixes/s, "
                 f"{b['rows']} rows, {b['errors']} rejected -> ratio to in-process {r['ratios']['batch_over_inprocess']:.2f} "
                 "(target >= 0.5)")
    if r.get("live_during_batch"):
        lb = r["live_during_batch"]
        i, d = lb["idle"], lb["during"]
        lines.append(f"live fixes at {lb['rate_per_s']:.0f}/s: alone p50/p95/p99 {i['p50_ms']:.1f}/{i['p95_ms']:.1f}/"
                     f"{i['p99_ms']:.1f} ms; during a {lb['payloads']}-payload batch ({lb['batch_fixes_per_s']:.0f} "
                     f"fixes/s, {lb['batch_seconds']:.1f} s) {d['p50_ms']:.1f}/{d['p95_ms']:.1f}/{d['p99_ms']:.1f} ms, "
                     f"{d['fixes']} fixes, {d['errors']} errors -> p95 ratio {lb['p95_during_over_idle']:.2f} "
                     "(target <= 2)")
    if r.get("split_ms"):
        lines.append("per-task split (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in r["split_ms"].items()))
    if r.get("cpu"):
        groups = sorted({g for c in r["cpu"].values() for g in c["cpu_ms_per_task"]})
        lines.append("CPU ms per task (per payload for the batch) by process: "
                     f"in-process pipeline {r.get('inprocess_cpu_ms_per_fix', math.nan):.2f} per fix")
        lines.append(f"{'phase':>13} " + " ".join(f"{g[:15]:>15}" for g in groups) + f" {'total':>7} cores")
        for phase, c in r["cpu"].items():
            lines.append(f"{phase:>13} " + " ".join(f"{c['cpu_ms_per_task'].get(g, 0.0):>15.2f}" for g in groups)
                         + f" {c['total_cpu_ms_per_task']:>7.2f} {c['cores_busy']:.2f}")
    if r.get("worker_efficiency"):
        e = r["worker_efficiency"]
        lines.append("the worker's own CPU per task (main + children; what its host pays with the broker and producers "
                     "elsewhere) and in-process CPU per fix / that:")
        for phase, w in e.items():
            eff = "-" if w["efficiency"] is None else f"{w['efficiency']:.2f}"
            target = {"predict": " (target >= 0.4)", "batch": " (target >= 0.6)", "reject": " (a rejection)"}.get(phase, "")
            lines.append(f"{phase:>13} main {w['worker_main_ms']:.2f} + children {w['worker_children_ms']:.2f} = "
                         f"{w['worker_ms']:.2f} ms -> efficiency {eff}{target}")
    m = r["message_bytes"]
    lines.append(f"broker bytes per fix: JSON/base64 {m['json_base64_bytes_per_fix'] / 1024:.1f} KiB, msgpack "
                 f"{m['msgpack_bytes_per_fix'] / 1024:.1f} KiB ({m['msgpack_over_json']:.2f}x)")
    a = r["accounting"]
    lines.append(f"accounting: {a['submitted']} submitted = {a['fix_rows']} fix rows + {a['rejection_rows']} "
                 f"rejections; lost {a['lost']}")
    return "\n".join(lines)


def plot_report(r: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    rates = [o["target_rate_per_s"] for o in r["open_loop"]]
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        a1.plot(rates, [o[key] for o in r["open_loop"]], style, label=key.replace("_ms", ""))
    a1.set_xlabel("offered load (fixes/s, Poisson)")
    a1.set_ylabel("end-to-end latency (ms)")
    a1.set_title("open loop")
    a1.grid(alpha=0.3)
    a1.legend()
    conc = [c["producers"] for c in r["closed_loop"]]
    a2.plot(conc, [c["throughput_per_s"] for c in r["closed_loop"]], "o-", label="heimdall.predict")
    a2.axhline(r["noop_per_s"], color="gray", ls="--", label="noop floor")
    a2.axhline(r["inprocess_fixes_per_s"], color="green", ls=":", label="in-process limit")
    a2.set_xscale("log")
    a2.set_xlabel("closed-loop producers")
    a2.set_ylabel("throughput (per s)")
    a2.set_title("throughput vs concurrency")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_report(r: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(r, indent=2, default=float))
