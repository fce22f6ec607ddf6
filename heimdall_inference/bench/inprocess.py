"""In-process benchmark: the pipeline's own rate on one core, the limit the service is measured against.

For each batch size it runs pre-serialised payloads (a realistic mix: 3-7 receivers, ci16 and
complex64, msgpack) through decode -> features -> one ``session.run`` -> fix documents for a fixed
time, and reports fixes/s and where the time goes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.codec import dumps
from ..core.localizer import Localizer
from ..core.fix import build_fixes
from ..core.session import SessionOptions
from ..lab.simulator import SignalConfig, scene_payloads, simulate

__all__ = ["make_payloads", "bench_in_process", "format_in_process"]


def make_payloads(localizer: Localizer, count: int, seed: int, fmt: str = "msgpack") -> list[bytes]:
    """``count`` serialised simulated payloads for the localizer's network."""
    sc, iq = simulate(localizer.spec.network, count, seed)
    signal = SignalConfig(sample_rate_hz=localizer.spec.sample_rate_hz,
                          snippet_s=localizer.spec.snippet_samples / localizer.spec.sample_rate_hz)
    docs = scene_payloads(sc, iq, localizer.spec.network, signal, seed=seed, binary=(fmt == "msgpack"))
    return [dumps(d, fmt) for d in docs]


@dataclass
class _Split:
    decode: float = 0.0
    features: float = 0.0
    inference: float = 0.0
    result: float = 0.0
    fixes: int = 0

    @property
    def total(self) -> float:
        return self.decode + self.features + self.inference + self.result


def bench_in_process(model_path: str | Path | None = None, *, batch_sizes: tuple[int, ...] = (1, 8, 32, 128),
                     seconds_per_size: float = 2.0, payloads: int = 512, seed: int = 11,
                     pin_one_core: bool = True) -> dict[str, Any]:
    """Fixes/s and the decode/features/inference/result split for each batch size, on one core."""
    saved = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if pin_one_core and saved:
        os.sched_setaffinity(0, {sorted(saved)[0]})
    try:
        return _bench(model_path, batch_sizes, seconds_per_size, payloads, seed)
    finally:
        if pin_one_core and saved:
            os.sched_setaffinity(0, saved)


def _bench(model_path, batch_sizes, seconds_per_size, payloads, seed) -> dict[str, Any]:
    from ..ops.cpu import one_thread_per_process

    one_thread_per_process()  # one core: no native thread pool of more
    loc = Localizer(model_path, session_options=SessionOptions(intra_op_threads=1))
    raw = make_payloads(loc, payloads, seed)
    out: dict[str, Any] = {"payloads": payloads, "payload_bytes_mean": sum(map(len, raw)) / len(raw),
                           "model": loc.session.info()["version"], "results": []}
    for bs in batch_sizes:
        split = _Split()
        deadline = time.perf_counter() + seconds_per_size
        i = 0
        while time.perf_counter() < deadline or split.fixes == 0:
            chunk = [raw[(i + k) % len(raw)] for k in range(bs)]
            i += bs
            t0 = time.perf_counter()
            decoded = [loc.decode(p) for p in chunk]
            t1 = time.perf_counter()
            est = loc.estimate(decoded)
            t2 = time.perf_counter()
            build_fixes(decoded, est.mean_enu, est.cov, loc.spec, timings_ms={})
            t3 = time.perf_counter()
            split.decode += t1 - t0
            split.features += est.features_ms / 1e3
            split.inference += est.inference_ms / 1e3
            split.result += t3 - t2
            split.fixes += bs
        tot = split.total
        out["results"].append({
            "batch": bs, "fixes": split.fixes, "fixes_per_s": split.fixes / tot,
            "ms_per_fix": 1e3 * tot / split.fixes,
            "share_pct": {k: round(100 * getattr(split, k) / tot, 1)
                          for k in ("decode", "features", "inference", "result")},
        })
    return out


def format_in_process(report: dict[str, Any]) -> str:
    lines = [f"in-process pipeline, one core, model v{report['model']}, {report['payloads']} msgpack payloads "
             f"(mean {report['payload_bytes_mean'] / 1024:.1f} KiB)",
             f"{'batch':>5} {'fixes/s':>9} {'ms/fix':>8}   decode  features  inference  result"]
    for r in report["results"]:
        s = r["share_pct"]
        lines.append(f"{r['batch']:>5} {r['fixes_per_s']:>9.0f} {r['ms_per_fix']:>8.3f}   {s['decode']:>5.1f}%"
                     f"  {s['features']:>7.1f}%  {s['inference']:>8.1f}%  {s['result']:>5.1f}%")
    return "\n".join(lines)
