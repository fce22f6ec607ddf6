"""Held-out evaluation: the model against the power-only limit and the Cramér-Rao bound.

**Grid posterior (the reference).** From each present receiver's band power ``P = mean|x|^2`` (in
mW via the model's full-scale power), with the thermal noise power ``N`` known, the excess power
``S = P - N`` is the received signal power. The simulator says ``10 log10 S ~ Normal(mu_i, s^2)``
with ``mu_i = Ptx - FSPL(d0, f) - 10 n log10(d_i / d0)`` and ``s^2 = sigma_shadow^2 + sigma_gain^2``,
plus the estimation noise of ``P`` over ``M`` samples (``var P ~ (S + N)^2 / M``, carried to dB by
the delta method). A receiver whose excess power is below ``detect_snr`` (-10 dB, five standard
deviations of the noise-only estimate) is treated as *censored*: its likelihood is
``Phi((10 log10(detect_snr N) - mu_i) / s)``, the probability that the signal is that weak. The
posterior over position on a 2 km grid covering the simulator's transmitter region marginalises
the transmit power (uniform prior; analytically where no receiver is censored, on a 0.5 dB grid
where one is), the path-loss exponent (17 values) and the shadowing spread (9 values) under the
simulator's own priors. Its mean is the minimum-mean-square-error estimate from power alone; its
highest-density regions are the Bayes credible regions.

**Cramér-Rao bound.** For ``y_i = Ptx - 10 n log10(d_i) + const + w_i`` with ``w_i ~ N(0, s^2)``
and unknown (east, north, Ptx), the Fisher information is ``J = (1/s^2) sum_i g_i g_i^T`` with
``g_i = (-(10 n / ln 10) (x - x_i) / d_i^2, -(10 n / ln 10) (y - y_i) / d_i^2, 1)``. The bound on
the position covariance is the top-left 2x2 block of ``J^-1`` (the Schur complement takes the
unknown power into account); we report ``sqrt(trace)``, the bound on the RMS position error, with
the scene's true ``n`` and ``s`` (an oracle bound: it ignores censoring and the prior, so it is
neither achievable far outside the network nor a limit for a biased, prior-informed estimator).
It also orders scenes by geometry for the tercile figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr

from ..core.network import Network
from ..core.localizer import Localizer
from .simulator import Priors, Scenes, SignalConfig, fspl_db, noise_power_dbm, scene_payloads, simulate
from ..core.spec import ModelSpec
from ..core.uncertainty import ellipse_scale, mahalanobis_sq

__all__ = ["GridPosterior", "crb_position", "evaluate", "EvaluationReport", "write_model_card"]

DB = 10.0 / np.log(10.0)


@dataclass(frozen=True)
class GridResult:
    mean: np.ndarray  #: [2] metres
    cov: np.ndarray  #: [2, 2] m^2
    hpd_mass_at: float  #: posterior mass of cells denser than the one holding ``truth`` (if given)


class GridPosterior:
    """Posterior over position from per-receiver band power, marginalising the nuisance parameters."""

    def __init__(self, network: Network, priors: Priors, signal: SignalConfig, *, grid_step_m: float = 2000.0,
                 power_step_db: float = 0.5, exponents: int = 17, spreads: int = 9, detect_snr: float = 0.1) -> None:
        self.network, self.priors, self.signal = network, priors, signal
        e0, e1, n0, n1 = priors.region(network)
        self.east = np.arange(e0 + grid_step_m / 2, e1, grid_step_m)
        self.north = np.arange(n0 + grid_step_m / 2, n1, grid_step_m)
        ge, gn = np.meshgrid(self.east, self.north, indexing="xy")
        self.cells = np.stack([ge.ravel(), gn.ravel()], axis=1)  # [G, 2]
        rx = network.receiver_enu()
        d = np.hypot(self.cells[:, None, 0] - rx[None, :, 0], self.cells[:, None, 1] - rx[None, :, 1])
        self.log_d = np.log10(np.maximum(d, priors.reference_distance_m) / priors.reference_distance_m)  # [G, R]
        self.exponents = _midpoints(*priors.path_loss_exponent, exponents)
        self.spreads = _midpoints(*priors.shadowing_db, spreads)
        self.powers = _midpoints(*priors.tx_power_dbm, int(round(np.ptp(priors.tx_power_dbm) / power_step_db)))
        self.detect_snr = detect_snr
        self.noise_mw = 10.0 ** (noise_power_dbm(signal.sample_rate_hz, priors.noise_figure_db) / 10.0)

    def observe(self, iq: np.ndarray, full_scale_dbm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[R', N] IQ -> (excess power dB, measurement variance dB^2, censored) per receiver."""
        p = np.mean(iq.real.astype(np.float64) ** 2 + iq.imag.astype(np.float64) ** 2, axis=1)
        p_mw = p * 10.0 ** (full_scale_dbm / 10.0)
        s = p_mw - self.noise_mw
        censored = s < self.detect_snr * self.noise_mw
        s = np.maximum(s, self.detect_snr * self.noise_mw)
        var_m = (DB * p_mw / s) ** 2 / iq.shape[1]
        return 10.0 * np.log10(s), var_m, censored

    def posterior(self, slots: np.ndarray, y_db: np.ndarray, var_m: np.ndarray, censored: np.ndarray,
                  freq_hz: float, truth: np.ndarray | None = None) -> GridResult:
        """Posterior mean/covariance over the grid (and the HPD mass at ``truth``)."""
        fspl0 = fspl_db(self.priors.reference_distance_m, freq_hz)
        log_d = self.log_d[:, slots]  # [G, r]
        unc, cen = ~censored, censored
        p_lo, p_hi = self.priors.tx_power_dbm
        logw = np.full(len(self.cells), -np.inf)
        thresh = 10 * np.log10(self.detect_snr * self.noise_mw)
        for spread in self.spreads:
            var = spread ** 2 + self.priors.gain_error_db ** 2 + var_m  # [r]
            for expo in self.exponents:
                loss = fspl0 + 10.0 * expo * log_d  # [G, r]: mu = Ptx - loss
                if not unc.any():  # every receiver below detection (a weak transmitter far out): censoring alone
                    mu_c = self.powers[None, :, None] - loss[:, None, :]  # [G, P, r]
                    cens = log_ndtr((thresh - mu_c) / np.sqrt(var)).sum(axis=2)
                    logw = np.logaddexp(logw, _logmeanexp(cens, axis=1) + np.log(p_hi - p_lo))
                    continue
                z = y_db[unc] + loss[:, unc]  # Ptx estimate from each uncensored receiver
                w = 1.0 / var[unc]
                a = w.sum()
                b = z @ w
                c = (z * z) @ w
                pm = b / a  # [G]
                base = -0.5 * (c - b * b / a) - 0.5 * np.sum(np.log(var[unc]))
                if not cen.any():
                    sa = np.sqrt(a)
                    mass = ndtr(sa * (p_hi - pm)) - ndtr(sa * (p_lo - pm))
                    ll = base + 0.5 * np.log(2 * np.pi / a) + np.log(np.maximum(mass, 1e-300))
                else:
                    pw = self.powers[None, :]
                    gauss = -0.5 * a * (pw - pm[:, None]) ** 2  # [G, P]
                    mu_c = pw[:, :, None] - loss[:, None, cen]  # [G, P, c]
                    cens = log_ndtr((thresh - mu_c) / np.sqrt(var[cen])).sum(axis=2)
                    ll = base + _logmeanexp(gauss + cens, axis=1) + np.log(p_hi - p_lo)
                logw = np.logaddexp(logw, ll)
        w = np.exp(logw - logw.max())
        w /= w.sum()
        mean = w @ self.cells
        d = self.cells - mean
        cov = (d * w[:, None]).T @ d
        hpd = float("nan")
        if truth is not None:
            cell = np.argmin(np.sum((self.cells - truth) ** 2, axis=1))
            hpd = float(w[w > w[cell]].sum())
        return GridResult(mean=mean, cov=cov, hpd_mass_at=hpd)


def _midpoints(lo: float, hi: float, n: int) -> np.ndarray:
    step = (hi - lo) / n
    return lo + step * (np.arange(n) + 0.5)


def _logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(mean(exp(x))) along ``axis``, without overflow."""
    return logsumexp(x, axis=axis) - np.log(x.shape[axis])


def crb_position(network: Network, scenes: Scenes, priors: Priors) -> np.ndarray:
    """[S, 2, 2] Cramér-Rao bound on the east/north error covariance (unknown Ptx; true n and spread)."""
    return crb_at(network, scenes.east_m, scenes.north_m, scenes.online, scenes.path_loss_exponent,
                  np.sqrt(scenes.shadowing_db ** 2 + priors.gain_error_db ** 2), priors.reference_distance_m)


def crb_at(network: Network, east_m: np.ndarray, north_m: np.ndarray, online: np.ndarray, exponent: np.ndarray,
           sigma_db: np.ndarray, reference_distance_m: float = 1000.0) -> np.ndarray:
    """[S, 2, 2] bound for transmitters at (east_m, north_m) heard by ``online`` [S, R] receivers."""
    rx = network.receiver_enu()
    out = np.empty((len(east_m), 2, 2))
    for i in range(len(east_m)):
        on = np.flatnonzero(online[i])
        dx = east_m[i] - rx[on, 0]
        dy = north_m[i] - rx[on, 1]
        d2 = np.maximum(dx * dx + dy * dy, reference_distance_m ** 2)
        k = -10.0 * exponent[i] / np.log(10.0)
        g = np.stack([k * dx / d2, k * dy / d2, np.ones_like(dx)], axis=1)
        fim = g.T @ g / sigma_db[i] ** 2
        # co-located receivers (giaveno, coazze) add no geometry: with too few distinct sites the
        # position is not identifiable from power alone and the bound is infinite
        if np.linalg.matrix_rank(fim, tol=1e-12 * np.abs(fim).max()) < 3:
            out[i] = np.diag([np.inf, np.inf])
        else:
            out[i] = np.linalg.inv(fim)[:2, :2]
    return out


@dataclass
class EvaluationReport:
    scenes: int
    seed: int
    model: dict[str, Any]
    errors_km: np.ndarray  #: [S] model
    grid_errors_km: np.ndarray  #: [S]
    crb_rms_km: np.ndarray  #: [S]
    covered: dict[float, np.ndarray]  #: confidence -> [S] bool, model ellipses
    grid_covered: dict[float, np.ndarray]  #: moment ellipses of the grid posterior
    grid_hpd_covered: dict[float, np.ndarray]  #: HPD regions of the grid posterior
    model_ms_per_fix: float
    grid_ms_per_fix: float
    seen_crb_rms_km: np.ndarray | None = None  #: [S] bound at the model's estimate (what an operator sees)
    extra: dict[str, Any] = field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        worst = _worst_tercile(self.crb_rms_km)  # geometry at the true position (oracle)
        seen = _worst_tercile(self.seen_crb_rms_km if self.seen_crb_rms_km is not None else self.crb_rms_km)
        finite = self.crb_rms_km[np.isfinite(self.crb_rms_km)]

        def cov(d: dict[float, np.ndarray], sel=slice(None)) -> dict[str, float]:
            return {f"{p:.2f}": round(100 * float(np.mean(v[sel])), 1) for p, v in d.items()}

        return {
            "scenes": self.scenes, "seed": self.seed,
            "model": {"median_km": round(float(np.median(self.errors_km)), 2),
                      "p95_km": round(float(np.percentile(self.errors_km, 95)), 2),
                      "coverage_pct": cov(self.covered), "coverage_worst_tercile_pct": cov(self.covered, worst),
                      "coverage_worst_seen_tercile_pct": cov(self.covered, seen),
                      "ms_per_fix": round(self.model_ms_per_fix, 4)},
            "grid_posterior": {"median_km": round(float(np.median(self.grid_errors_km)), 2),
                               "p95_km": round(float(np.percentile(self.grid_errors_km, 95)), 2),
                               "coverage_pct": cov(self.grid_covered),
                               "coverage_worst_tercile_pct": cov(self.grid_covered, worst),
                               "coverage_worst_seen_tercile_pct": cov(self.grid_covered, seen),
                               "hpd_coverage_pct": cov(self.grid_hpd_covered),
                               "hpd_coverage_worst_tercile_pct": cov(self.grid_hpd_covered, worst),
                               "ms_per_fix": round(self.grid_ms_per_fix, 2)},
            "crb_rms_km": {"median": round(float(np.median(finite)), 2) if finite.size else None,
                           "p95": round(float(np.percentile(finite, 95)), 2) if finite.size else None,
                           "unidentifiable_pct": round(100 * (1 - finite.size / len(self.crb_rms_km)), 1)},
            "ratios": {"median_error_model_over_grid": round(float(np.median(self.errors_km) /
                                                                   np.median(self.grid_errors_km)), 3),
                       "cost_model_over_grid": round(self.model_ms_per_fix / self.grid_ms_per_fix, 5)},
        }

    def card(self) -> dict[str, Any]:
        return {"evaluation": self.figures()}

    def table(self) -> str:
        f = self.figures()
        m, g = f["model"], f["grid_posterior"]
        rows = [
            ("", "model", "grid posterior"),
            ("median error km", f"{m['median_km']:.1f}", f"{g['median_km']:.1f}"),
            ("p95 error km", f"{m['p95_km']:.1f}", f"{g['p95_km']:.1f}"),
            ("68% coverage %", f"{m['coverage_pct']['0.68']:.1f}", f"{g['coverage_pct']['0.68']:.1f}"),
            ("95% coverage %", f"{m['coverage_pct']['0.95']:.1f}", f"{g['coverage_pct']['0.95']:.1f}"),
            ("68% cov. worst tercile %", f"{m['coverage_worst_tercile_pct']['0.68']:.1f}",
             f"{g['coverage_worst_tercile_pct']['0.68']:.1f}"),
            ("95% cov. worst tercile %", f"{m['coverage_worst_tercile_pct']['0.95']:.1f}",
             f"{g['coverage_worst_tercile_pct']['0.95']:.1f}"),
            ("68% / 95% cov. worst seen tercile %",
             f"{m['coverage_worst_seen_tercile_pct']['0.68']:.1f} / {m['coverage_worst_seen_tercile_pct']['0.95']:.1f}",
             f"{g['coverage_worst_seen_tercile_pct']['0.68']:.1f} / {g['coverage_worst_seen_tercile_pct']['0.95']:.1f}"),
            ("HPD 68% / 95% coverage %", "-", f"{g['hpd_coverage_pct']['0.68']:.1f} / {g['hpd_coverage_pct']['0.95']:.1f}"),
            ("HPD 68% / 95% worst tercile %", "-",
             f"{g['hpd_coverage_worst_tercile_pct']['0.68']:.1f} / {g['hpd_coverage_worst_tercile_pct']['0.95']:.1f}"),
            ("cost ms per fix", f"{m['ms_per_fix']:.3f}", f"{g['ms_per_fix']:.1f}"),
        ]
        w = [max(len(r[j]) for r in rows) for j in range(3)]
        lines = [" | ".join(c.ljust(w[j]) for j, c in enumerate(r)) for r in rows]
        lines.insert(1, "-+-".join("-" * x for x in w))
        r = f["ratios"]
        lines.append(f"median error model/grid = {r['median_error_model_over_grid']:.3f} (target <= 1.1); "
                     f"cost model/grid = {r['cost_model_over_grid']:.5f} (target < 0.01); "
                     f"CRB rms median {f['crb_rms_km']['median']} km, p95 {f['crb_rms_km']['p95']} km "
                     f"({f['crb_rms_km']['unidentifiable_pct']} % of scenes unidentifiable); "
                     f"{f['scenes']} scenes, seed {f['seed']}")
        return "\n".join(lines)


def _worst_tercile(values: np.ndarray) -> np.ndarray:
    """The third of scenes with the largest values (inf last), as a boolean mask."""
    rank = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    return rank >= (2 * len(rank)) // 3


def evaluate(model_path: str | Path | None = None, *, scenes: int = 1000, seed: int = 2026,
             grid_step_m: float = 2000.0, batch: int = 256, priors: Priors | None = None,
             signal: SignalConfig | None = None, progress=None) -> EvaluationReport:
    """Simulate held-out scenes, run them through the real payload path and the grid posterior."""
    priors, signal = priors or Priors(), signal or SignalConfig()
    loc = Localizer(model_path)
    spec = loc.spec
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
    mean, cov = np.concatenate(means), np.concatenate(covs)
    truth = np.stack([sc.east_m, sc.north_m], axis=1)
    grid = GridPosterior(spec.network, priors, signal, grid_step_m=grid_step_m)
    index = spec.network.index
    g_mean, g_cov, hpd = np.empty((scenes, 2)), np.empty((scenes, 2, 2)), np.empty(scenes)
    t0 = time.perf_counter()
    for i, d in enumerate(decoded_all):
        slots = np.array([index[r] for r in d.receiver_ids])
        y, var_m, cen = grid.observe(d.iq, spec.features.full_scale_dbm)
        res = grid.posterior(slots, y, var_m, cen, d.center_freq_hz, truth=truth[i])
        g_mean[i], g_cov[i], hpd[i] = res.mean, res.cov, res.hpd_mass_at
        if progress and (i + 1) % 100 == 0:
            progress(f"grid posterior {i + 1}/{scenes}")
    t_grid = time.perf_counter() - t0
    confs = (0.68, 0.95)
    k2 = {p: float(ellipse_scale(p, spec.dof)) ** 2 for p in confs}  # the model's own family
    g2k = {p: float(ellipse_scale(p)) ** 2 for p in confs}  # the grid's moments: Gaussian ellipses
    m2 = mahalanobis_sq(truth - mean, cov)
    g2 = mahalanobis_sq(truth - g_mean, g_cov + np.eye(2) * 1e-6)
    crb = crb_position(spec.network, sc, priors)
    # the geometry an operator sees: the bound at the model's own estimate, with the receivers that
    # were online and the priors' central exponent and spread
    mid_n = np.full(scenes, np.mean(priors.path_loss_exponent))
    mid_s = np.full(scenes, np.hypot(np.mean(priors.shadowing_db), priors.gain_error_db))
    seen = crb_at(spec.network, mean[:, 0], mean[:, 1], sc.online, mid_n, mid_s, priors.reference_distance_m)
    return EvaluationReport(
        scenes=scenes, seed=seed, model={"name": spec.name, "version": spec.version},
        errors_km=np.linalg.norm(mean - truth, axis=1) / 1e3,
        grid_errors_km=np.linalg.norm(g_mean - truth, axis=1) / 1e3,
        crb_rms_km=np.sqrt(np.trace(crb, axis1=1, axis2=2)) / 1e3,
        covered={p: m2 <= k2[p] for p in confs}, grid_covered={p: g2 <= g2k[p] for p in confs},
        grid_hpd_covered={p: hpd <= p for p in confs},
        model_ms_per_fix=1e3 * t_model / scenes, grid_ms_per_fix=1e3 * t_grid / scenes,
        seen_crb_rms_km=np.sqrt(np.trace(seen, axis1=1, axis2=2)) / 1e3,
    )


def write_model_card(report: EvaluationReport, spec: ModelSpec, path: Path) -> None:
    """Markdown model card with the evaluation figures (written by the training script)."""
    f = report.figures()
    t = spec.training
    u = spec.uncertainty
    family = (f"Student-t with {u['dof']} degrees of freedom, fitted by maximum likelihood on "
              f"{u.get('fitted_on_scenes')} held-out training scenes (the errors are heavier-tailed than "
              "Gaussian; the ellipse radius is sqrt(2 F.ppf(p, 2, dof) (dof - 2) / dof), which tends to "
              "sqrt(chi2.ppf(p, 2)) as dof grows)" if u.get("family") == "student_t" else
              "Gaussian (ellipse radius sqrt(chi2.ppf(p, 2)))")
    text = f"""# Model card: {spec.name} v{spec.version}

Power-based localisation of a VHF transmitter from IQ snippets of the {len(spec.network)}-receiver
network `{spec.network.name}` ({', '.join(spec.network.ids)}). Inputs: log-mel features
[batch, {len(spec.network)}, {spec.features.n_mels}, {spec.features.frames}] and a receiver mask; outputs: the
mean east/north (metres from {spec.network.origin_lat:.4f}, {spec.network.origin_lon:.4f}) and a full 2x2
covariance. Trained by `python -m heimdall_inference.lab.training` on {t.get('scenes')} simulated
scenes (seed {t.get('seed')}, {t.get('epochs')} epochs, torch {t.get('torch')}) with the Gaussian negative
log-likelihood. Predictive family for the ellipses: {family}. Physics and priors:
`heimdall_inference/lab/simulator.py`.

## Held-out evaluation ({f['scenes']} scenes, seed {f['seed']}, through the real payload decoder)

```
{report.table()}
```

- *grid posterior*: the Bayes posterior from band power alone, marginalising transmit power,
  path-loss exponent and shadowing under the simulator's priors (`heimdall_inference/lab/evaluation.py`);
  its median error is the limit for power-only information. "HPD" is the coverage of its exact
  highest-density credible regions, which checks the reference itself.
- *coverage*: share of scenes whose true position lies inside the 68 % / 95 % ellipse (the model's
  family; the grid posterior's moment ellipses are Gaussian); *worst tercile*: the third of scenes with the largest Cramér-Rao bound at
  the true position (an oracle selection); *worst seen tercile*: the third with the largest bound at
  the model's own estimate, with the receivers online (the geometry an operator can see).
- *CRB*: the Cramér-Rao bound on RMS position error with unknown transmit power (oracle n, sigma).
- cost: wall time per fix on one core (model: decode + features + ONNX, batches of 256).

## Limits

Simulated physics only (log-distance path loss, log-normal shadowing, no terrain, no multipath
fading across the snippet, no interference). Outside the network hull the power-only problem is
ill-posed and both estimators are far off; the ellipse says so.

```json
{json.dumps(f, indent=2)}
```
"""
    path.write_text(text)
