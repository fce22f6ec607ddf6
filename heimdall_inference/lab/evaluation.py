"""Held-out evaluation: the model against the power-only limit (:mod:`.grid`) and the Cramér-Rao bound.

:func:`evaluate` simulates held-out scenes of one world in one band (:mod:`.simulator`: ``Priors.preset``),
sends them through the real payload decoder and the model, and through the grid posterior that marginalises
the *same* world's priors (its fault hypotheses included). :class:`EvaluationReport` gives the figures the
model card shows: median and 95th-percentile errors of both, the coverage of the 68 % and 95 % ellipses
(overall, in the worst tercile of geometry at the true position and in the worst tercile of the geometry an
operator sees), a reliability diagram (nominal vs empirical coverage for p = 0.1 ... 0.99) and the figures by
number of receivers online (3 to 7).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.localizer import Localizer
from ..core.spec import ModelSpec
from ..core.uncertainty import ellipse_scale, mahalanobis_sq
from .grid import GridPosterior, crb_at, crb_position
from .simulator import BANDS, Priors, SignalConfig, scene_payloads, simulate

__all__ = ["GridPosterior", "crb_position", "evaluate", "EvaluationReport", "band_of", "RELIABILITY_LEVELS",
           "CONFIDENCES"]

CONFIDENCES = (0.68, 0.95)
RELIABILITY_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.68, 0.7, 0.8, 0.9, 0.95, 0.99)
"""The nominal coverages of the reliability diagram."""


def band_of(spec: ModelSpec) -> str:
    """The network band (:data:`~.simulator.BANDS`) a model's declared centre frequencies lie in."""
    lo, hi = min(b[0] for b in spec.bands_hz), max(b[1] for b in spec.bands_hz)
    for name, (b_lo, b_hi) in BANDS.items():
        if b_lo <= lo and hi <= b_hi:
            return name
    raise ValueError(f"the model's bands {[list(b) for b in spec.bands_hz]} are not one of the network's {BANDS}")


@dataclass
class EvaluationReport:
    scenes: int
    seed: int
    model: dict[str, Any]
    errors_km: np.ndarray  #: [S] model
    crb_rms_km: np.ndarray  #: [S]
    model_m2: np.ndarray  #: [S] squared Mahalanobis distance of the truth under the model's covariance
    dof: float | None  #: the model's predictive family (None: Gaussian)
    n_online: np.ndarray  #: [S] receivers in the payload
    model_ms_per_fix: float
    world: str = "nominal"
    band: str = "2m"
    priors: dict[str, Any] = field(default_factory=dict)
    grid_errors_km: np.ndarray | None = None  #: [S]; None: the grid posterior was not run
    grid_m2: np.ndarray | None = None  #: [S] under the grid posterior's moments (Gaussian ellipses)
    grid_hpd: np.ndarray | None = None  #: [S] posterior mass of the cells denser than the truth's
    grid_ms_per_fix: float = float("nan")
    grid_step_m: float | None = None
    seen_crb_rms_km: np.ndarray | None = None  #: [S] bound at the model's estimate (what an operator sees)
    extra: dict[str, Any] = field(default_factory=dict)

    def covered(self, p: float, sel: Any = slice(None)) -> float:
        """Share of scenes (in ``sel``) whose truth lies inside the model's ``p`` ellipse."""
        return float(np.mean(self.model_m2[sel] <= float(ellipse_scale(p, self.dof)) ** 2))

    def grid_covered(self, p: float, sel: Any = slice(None), *, hpd: bool = False) -> float:
        """The same for the grid posterior: its Gaussian moment ellipse, or (``hpd``) its highest-density region."""
        assert self.grid_m2 is not None and self.grid_hpd is not None
        if hpd:
            return float(np.mean(self.grid_hpd[sel] <= p))
        return float(np.mean(self.grid_m2[sel] <= float(ellipse_scale(p)) ** 2))

    def figures(self) -> dict[str, Any]:
        worst = _worst_tercile(self.crb_rms_km)  # geometry at the true position (oracle)
        seen = _worst_tercile(self.seen_crb_rms_km if self.seen_crb_rms_km is not None else self.crb_rms_km)
        finite = self.crb_rms_km[np.isfinite(self.crb_rms_km)]
        grid = self.grid_m2 is not None

        def pct(f: Callable[..., float], sel: Any = slice(None), **kw: Any) -> dict[str, float]:
            return {f"{p:.2f}": round(100 * f(p, sel, **kw), 1) for p in CONFIDENCES}

        out: dict[str, Any] = {
            "world": self.world, "band": self.band, "scenes": self.scenes, "seed": self.seed,
            "model": {"median_km": _r(np.median(self.errors_km)), "p95_km": _r(np.percentile(self.errors_km, 95)),
                      "coverage_pct": pct(self.covered), "coverage_worst_tercile_pct": pct(self.covered, worst),
                      "coverage_worst_seen_tercile_pct": pct(self.covered, seen),
                      "ms_per_fix": round(self.model_ms_per_fix, 4)},
            "crb_rms_km": {"median": _r(np.median(finite)) if finite.size else None,
                           "p95": _r(np.percentile(finite, 95)) if finite.size else None,
                           "unidentifiable_pct": round(100 * (1 - finite.size / len(self.crb_rms_km)), 1)},
            "reliability": {"levels": list(RELIABILITY_LEVELS),
                            "model_pct": [round(100 * self.covered(p), 1) for p in RELIABILITY_LEVELS]},
            "by_receivers": {},
        }
        if grid:
            g = self.grid_errors_km
            out["grid_posterior"] = {
                "median_km": _r(np.median(g)), "p95_km": _r(np.percentile(g, 95)),
                "coverage_pct": pct(self.grid_covered), "coverage_worst_tercile_pct": pct(self.grid_covered, worst),
                "coverage_worst_seen_tercile_pct": pct(self.grid_covered, seen),
                "hpd_coverage_pct": pct(self.grid_covered, hpd=True),
                "hpd_coverage_worst_tercile_pct": pct(self.grid_covered, worst, hpd=True),
                "hpd_coverage_worst_seen_tercile_pct": pct(self.grid_covered, seen, hpd=True),
                "ms_per_fix": round(self.grid_ms_per_fix, 2), "grid_step_m": self.grid_step_m}
            out["ratios"] = {"median_error_model_over_grid": round(float(np.median(self.errors_km) / np.median(g)), 3),
                             "cost_model_over_grid": round(self.model_ms_per_fix / self.grid_ms_per_fix, 5)}
            out["reliability"]["grid_hpd_pct"] = [round(100 * self.grid_covered(p, hpd=True), 1)
                                                  for p in RELIABILITY_LEVELS]
        for k in range(3, 8):
            sel = self.n_online == k
            if not sel.any():
                continue
            row: dict[str, Any] = {"scenes": int(sel.sum()), "model_median_km": _r(np.median(self.errors_km[sel])),
                                   "model_coverage_pct": pct(self.covered, sel)}
            if grid:
                row["grid_median_km"] = _r(np.median(self.grid_errors_km[sel]))
                row["median_error_model_over_grid"] = round(row["model_median_km"] / max(row["grid_median_km"], 1e-9), 3)
                row["grid_hpd_coverage_pct"] = pct(self.grid_covered, sel, hpd=True)
            out["by_receivers"][str(k)] = row
        return out

    def table(self) -> str:
        """The headline figures as a text table."""
        return figures_table(self.figures())

    def receivers_table(self) -> str:
        """The figures by number of receivers online, as a Markdown table."""
        return receivers_table(self.figures())


def figures_table(f: dict[str, Any]) -> str:
    """An evaluation's headline figures (:meth:`EvaluationReport.figures`) as a text table."""
    m, g = f["model"], f.get("grid_posterior")
    cols = ("model", "grid posterior") if g else ("model",)

    def row(label: str, mv: str, gv: str = "-") -> tuple[str, ...]:
        return (label, mv, gv) if g else (label, mv)

    def two(d: dict[str, float]) -> str:
        return f"{d['0.68']:.1f} / {d['0.95']:.1f}"

    rows = [("",) + cols,
            row("median error km", f"{m['median_km']:.1f}", f"{g['median_km']:.1f}" if g else "-"),
            row("p95 error km", f"{m['p95_km']:.1f}", f"{g['p95_km']:.1f}" if g else "-"),
            row("68% / 95% coverage %", two(m["coverage_pct"]), two(g["coverage_pct"]) if g else "-"),
            row("68% / 95% cov. worst tercile %", two(m["coverage_worst_tercile_pct"]),
                two(g["coverage_worst_tercile_pct"]) if g else "-"),
            row("68% / 95% cov. worst seen tercile %", two(m["coverage_worst_seen_tercile_pct"]),
                two(g["coverage_worst_seen_tercile_pct"]) if g else "-")]
    if g:
        rows += [row("HPD 68% / 95% coverage %", "-", two(g["hpd_coverage_pct"])),
                 row("HPD 68% / 95% worst seen tercile %", "-", two(g["hpd_coverage_worst_seen_tercile_pct"]))]
    rows.append(row("cost ms per fix", f"{m['ms_per_fix']:.3f}", f"{g['ms_per_fix']:.1f}" if g else "-"))
    w = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w[j]) for j, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    tail = f"{f['band']} band, {f['world']} world, {f['scenes']} scenes, seed {f['seed']}"
    if g:
        r = f["ratios"]
        tail = (f"median error model/grid = {r['median_error_model_over_grid']:.3f}; cost model/grid = "
                f"{r['cost_model_over_grid']:.5f}; ") + tail
    lines.append(tail + f"; CRB rms median {f['crb_rms_km']['median']} km "
                 f"({f['crb_rms_km']['unidentifiable_pct']} % of scenes unidentifiable)")
    return "\n".join(lines)


def receivers_table(f: dict[str, Any]) -> str:
    """An evaluation's figures by number of receivers online (:meth:`EvaluationReport.figures`), as a Markdown table."""
    grid = "grid_posterior" in f
    head = "| receivers | scenes | model median km |" + (" grid median km | model/grid |" if grid else "") + \
        " model 68 % / 95 % coverage |" + (" grid HPD 68 % / 95 % |" if grid else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k, r in f["by_receivers"].items():
        c = r["model_coverage_pct"]
        line = f"| {k} | {r['scenes']} | {r['model_median_km']:.1f} |"
        if grid:
            line += f" {r['grid_median_km']:.1f} | {r['median_error_model_over_grid']:.3f} |"
        line += f" {c['0.68']:.1f} / {c['0.95']:.1f} |"
        if grid:
            h = r["grid_hpd_coverage_pct"]
            line += f" {h['0.68']:.1f} / {h['0.95']:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def _r(x: Any) -> float:
    return round(float(x), 2)


def _worst_tercile(values: np.ndarray) -> np.ndarray:
    """The third of scenes with the largest values (inf last), as a boolean mask."""
    rank = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return rank >= (2 * len(rank)) // 3


def default_grid_step_m(priors: Priors) -> float:
    """2 km cells; 4 km in a world whose posteriors are as broad as the wide world's (:mod:`.grid`: the same mean
    within a median 0.55 km, at a quarter of the cost)."""
    return 4000.0 if priors.world == "wide" else 2000.0


_GRIDS: dict[tuple, GridPosterior] = {}


def _grid_chunk(args: tuple) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Grid posteriors of a chunk of scenes (in a worker process): (mean, cov, hpd mass at the truth, seconds)."""
    network, priors, signal, step, jobs = args
    key = (network, priors, signal, step)
    if key not in _GRIDS:
        _GRIDS.clear()
        _GRIDS[key] = GridPosterior(network, priors, signal, grid_step_m=step)
    grid = _GRIDS[key]
    out = []
    for slots, y, var_m, cen, freq, truth in jobs:
        t0 = time.perf_counter()
        res = grid.posterior(slots, y, var_m, cen, freq, truth=truth)
        out.append((res.mean, res.cov, res.hpd_mass_at, time.perf_counter() - t0))
    return out


def evaluate(model_path: str | Path | None = None, *, scenes: int = 1000, seed: int = 2026,
             grid_step_m: float | None = None, batch: int = 256, priors: Priors | None = None,
             signal: SignalConfig | None = None, progress: Callable[[str], None] | None = None,
             grid: bool = True, workers: int = 1) -> EvaluationReport:
    """Simulate held-out scenes of ``priors``' world (default: the model's band, nominal world), run them through
    the real payload path and (``grid``) through the grid posterior of the same priors, in ``workers`` processes."""
    loc = Localizer(model_path)
    spec = loc.spec
    priors, signal = priors or Priors.nominal(band_of(spec)), signal or SignalConfig()
    sc, iq = simulate(spec.network, scenes, seed, priors=priors, signal=signal)
    payloads = scene_payloads(sc, iq, spec.network, signal, seed=seed, binary=True)
    del iq
    means, covs, decoded_all = [], [], []
    t_model = 0.0
    for i in range(0, scenes, batch):
        t0 = time.perf_counter()
        decoded = [loc.decode(p) for p in payloads[i:i + batch]]
        est = loc.estimate(decoded)
        t_model += time.perf_counter() - t0
        means.append(est.mean_enu)
        covs.append(est.cov)
        decoded_all.extend(decoded)
    del payloads
    mean, cov = np.concatenate(means), np.concatenate(covs)
    truth = np.stack([sc.east_m, sc.north_m], axis=1)
    crb = crb_position(spec.network, sc, priors)
    # the geometry an operator sees: the bound at the model's own estimate, with the receivers that
    # were online and the priors' central exponent and spread
    mid_n = np.full(scenes, np.mean(priors.path_loss_exponent))
    mid_s = np.full(scenes, np.hypot(np.mean(priors.shadowing_db), priors.gain_error_db))
    seen = crb_at(spec.network, mean[:, 0], mean[:, 1], sc.online, mid_n, mid_s, priors.reference_distance_m)
    report = EvaluationReport(
        scenes=scenes, seed=seed, model={"name": spec.name, "version": spec.version},
        errors_km=np.linalg.norm(mean - truth, axis=1) / 1e3,
        crb_rms_km=np.sqrt(np.trace(crb, axis1=1, axis2=2)) / 1e3, model_m2=mahalanobis_sq(truth - mean, cov),
        dof=spec.dof, n_online=sc.online.sum(axis=1), model_ms_per_fix=1e3 * t_model / scenes,
        world=priors.world, band=priors.band, priors=priors.to_dict(),
        seen_crb_rms_km=np.sqrt(np.trace(seen, axis1=1, axis2=2)) / 1e3)
    if not grid:
        return report
    step = grid_step_m or default_grid_step_m(priors)
    observer = GridPosterior(spec.network, priors, signal, grid_step_m=1e9)  # observe() needs no cells
    index = spec.network.index
    jobs = []
    for i, d in enumerate(decoded_all):
        y, var_m, cen = observer.observe(d.iq, spec.features.full_scale_dbm)
        jobs.append((np.array([index[r] for r in d.receiver_ids]), y, var_m, cen, d.center_freq_hz, truth[i]))
    del decoded_all
    size = max(1, min(50, -(-len(jobs) // max(1, workers))))
    chunks = [(spec.network, priors, signal, step, jobs[i:i + size]) for i in range(0, len(jobs), size)]
    results: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    mapper: Any = map if workers <= 1 else ProcessPoolExecutor(workers).map
    for part in mapper(_grid_chunk, chunks):
        results.extend(part)
        if progress:
            progress(f"grid posterior {len(results)}/{scenes}")
    if workers > 1:
        mapper.__self__.shutdown()
    g_mean = np.array([r[0] for r in results])
    g_cov = np.array([r[1] for r in results])
    report.grid_errors_km = np.linalg.norm(g_mean - truth, axis=1) / 1e3
    report.grid_m2 = mahalanobis_sq(truth - g_mean, g_cov + np.eye(2) * 1e-6)
    report.grid_hpd = np.array([r[2] for r in results])
    report.grid_ms_per_fix = 1e3 * sum(r[3] for r in results) / scenes  # one core's time, whatever the workers
    report.grid_step_m = step
    return report
