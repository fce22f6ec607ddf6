"""The reference estimators: the power-only grid posterior and the Cramér-Rao bound.

**Grid posterior (the reference).** From each present receiver's band power ``P = mean|x|^2`` (in
mW via the model's full-scale power), with the thermal noise power ``N`` known, the excess power
``S = P - N`` is the received signal power. The simulator says ``10 log10 S ~ Normal(mu_i, s^2)``
with ``mu_i = Ptx - FSPL(d0, f) - 10 n log10(d_i / d0)`` and ``s^2 = sigma_shadow^2 + sigma_gain^2``,
plus the estimation noise of ``P`` over ``M`` samples (``var P ~ (S + N)^2 / M``, carried to dB by
the delta method). A receiver whose excess power is below ``detect_snr`` (-10 dB, five standard
deviations of the noise-only estimate) is treated as *censored*: its likelihood is
``Phi((10 log10(detect_snr N) - mu_i) / s)``, the probability that the signal is that weak. The
posterior over position on a grid covering the simulator's transmitter region (2 km cells; 4 km
serve as well where the posterior is as broad as in the wide world: the posterior mean moves by a
median 0.55 km against 2 km cells, with median errors of 70 km) marginalises the transmit power
(uniform prior; analytically where no receiver is censored, by 10-node Gauss-Legendre quadrature over
+-4.5 sigma of the Gaussian part where one is), the path-loss exponent (17 values) and the shadowing
spread (9 values) under the simulator's own priors, and, in a world with faulty receivers, the fault
hypotheses (:meth:`GridPosterior.hypotheses`: every receiver sound; receiver j badly miscalibrated,
for each j; censored receiver j hearing only noise, for each such j) with the world's own shares.
Its mean is the minimum-mean-square-error estimate from power alone; its highest-density regions are
the Bayes credible regions.

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

from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr

from ..core.network import Network
from .simulator import Priors, Scenes, SignalConfig, fspl_db, noise_power_dbm

__all__ = ["GridPosterior", "GridResult", "crb_position", "crb_at"]

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
        cells = np.stack([ge.ravel(), gn.ravel()], axis=1)
        self.cells = cells[priors.contains(network, cells[:, 0], cells[:, 1])]  # [G, 2]: the prior's support
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

    def hypotheses(self, censored: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fault hypotheses of the priors for ``r`` receivers (``censored`` [r]): (extra variance [H, r] dB^2,
        kept [H, r] bool, log prior [H]). With no faults in the world, one: all receivers sound. Otherwise also
        "receiver j is badly miscalibrated" for every j (its variance grows by ``miscalibration_db^2``) and
        "receiver j hears only noise" for every censored j (it then tells nothing: it is left out; an uncensored
        receiver is never deaf, since noise alone stays below the detection threshold but for a ~1e-7 chance)."""
        r = len(censored)
        pr = self.priors
        extra, keep, logp = [np.zeros(r)], [np.ones(r, bool)], [np.log1p(-pr.miscalibrated_share - pr.deaf_share)]
        if pr.miscalibrated_share > 0:
            for j in range(r):
                e = np.zeros(r)
                e[j] = pr.miscalibration_db ** 2
                extra.append(e)
                keep.append(np.ones(r, bool))
                logp.append(np.log(pr.miscalibrated_share / r))
        if pr.deaf_share > 0:
            for j in np.flatnonzero(censored):
                k = np.ones(r, bool)
                k[j] = False
                extra.append(np.zeros(r))
                keep.append(k)
                logp.append(np.log(pr.deaf_share / r))
        return np.array(extra), np.array(keep), np.array(logp)

    def posterior(self, slots: np.ndarray, y_db: np.ndarray, var_m: np.ndarray, censored: np.ndarray,
                  freq_hz: float, truth: np.ndarray | None = None) -> GridResult:
        """Posterior mean/covariance over the grid (and the HPD mass at ``truth``), marginalising transmit power,
        exponent, shadowing spread and the world's fault hypotheses (:meth:`hypotheses`)."""
        fspl0 = fspl_db(self.priors.reference_distance_m, freq_hz)
        log_d = self.log_d[:, slots]  # [G, r]
        extra, keep, log_prior = self.hypotheses(censored)
        logw = np.full(len(self.cells), -np.inf)
        for spread in self.spreads:
            var = spread ** 2 + self.priors.gain_error_db ** 2 + var_m  # [r]
            v = var[None, :] + extra  # [H, r]
            for expo in self.exponents:
                loss = fspl0 + 10.0 * expo * log_d  # [G, r]: mu = Ptx - loss
                ll = self._loglik(loss, y_db, v, keep, censored)  # [G, H]
                logw = np.logaddexp(logw, ll[:, 0] + log_prior[0] if len(log_prior) == 1 else _lse(ll + log_prior))
        if not np.isfinite(logw.max()):  # nothing fits at all (cannot happen with the world's own data): the prior
            logw = np.zeros_like(logw)
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

    def _loglik(self, loss: np.ndarray, y_db: np.ndarray, v: np.ndarray, keep: np.ndarray,
                censored: np.ndarray) -> np.ndarray:
        """[G, H] log-likelihood of the observations per cell and hypothesis, transmit power marginalised (up to
        the constant of its uniform prior). ``v`` [H, r] variances, ``keep`` [H, r] receivers each hypothesis uses."""
        p_lo, p_hi = self.priors.tx_power_dbm
        thresh = 10 * np.log10(self.detect_snr * self.noise_mw)
        unc = ~censored
        if not unc.any():  # every receiver below detection (a weak transmitter far out): censoring alone
            out = np.empty((len(loss), len(v)))
            mu = self.powers[None, :, None] - loss[:, None, :]  # [G, P, r]
            for h in range(len(v)):
                k = keep[h]
                cens = log_ndtr((thresh - mu[:, :, k]) / np.sqrt(v[h, k])).sum(axis=2)
                out[:, h] = _logmeanexp(cens, axis=1) + np.log(p_hi - p_lo)
            return out
        z = y_db[unc] + loss[:, unc]  # [G, u]: Ptx estimate from each uncensored receiver
        w = 1.0 / v[:, unc]  # [H, u] (a deaf hypothesis drops only censored receivers)
        a = w.sum(axis=1)  # [H]
        b = z @ w.T  # [G, H]
        c = (z * z) @ w.T
        pm = b / a  # [G, H]: the power that fits best
        base = -0.5 * (c - b * b / a) - 0.5 * np.log(v[:, unc]).sum(axis=1)
        if not censored.any():
            sa = np.sqrt(a)
            mass = ndtr(sa * (p_hi - pm)) - ndtr(sa * (p_lo - pm))
            return base + 0.5 * np.log(2 * np.pi / a) + np.log(np.maximum(mass, 1e-300))
        # censored receivers: integrate the power by Gauss-Legendre over +-GL_WIDTH sigma of each hypothesis'
        # Gaussian part, inside the prior (an interval of one sigma at the prior's edge when pm lies beyond it);
        # float32 from here (these arrays are the posterior's whole cost; log-likelihoods are a few hundred at most)
        sd = 1.0 / np.sqrt(a)  # [H]
        lo = np.clip(pm - GL_WIDTH * sd, p_lo, p_hi - sd)
        hi = np.clip(pm + GL_WIDTH * sd, lo + sd, p_hi)
        half = 0.5 * (hi - lo)
        pw = ((lo + half)[..., None] + half[..., None] * GL_NODES).astype(np.float32)  # [G, H, Q]
        gauss = np.float32(-0.5) * a.astype(np.float32)[None, :, None] * (pw - pm.astype(np.float32)[..., None]) ** 2
        cen = np.flatnonzero(censored)
        total = np.zeros_like(gauss)
        for k, c in enumerate(cen):  # one censored receiver at a time: [G, H, Q] arrays, never [G, H, Q, c]
            inv_sd = (1.0 / np.sqrt(v[:, c])).astype(np.float32)[None, :, None]
            t = log_ndtr((np.float32(thresh) + loss[:, c].astype(np.float32)[:, None, None] - pw) * inv_sd)
            total += np.where(keep[:, c][None, :, None], t, np.float32(0.0))
        return base + _lse(gauss + total + np.log(GL_WEIGHTS).astype(np.float32)) + np.log(half)


GL_NODES, GL_WEIGHTS = np.polynomial.legendre.leggauss(10)
"""Gauss-Legendre nodes on [-1, 1] for the transmit power where receivers are censored: 10 nodes integrate a
Gaussian over a window of +-4.5 of its sigmas to 2e-4."""
GL_WIDTH = 4.5


def _midpoints(lo: float, hi: float, n: int) -> np.ndarray:
    step = (hi - lo) / n
    return lo + step * (np.arange(n) + 0.5)


def _lse(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, without overflow (scipy's logsumexp costs 5x more on small axes)."""
    m = x.max(axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def _logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(mean(exp(x))) along ``axis``, without overflow."""
    return logsumexp(x, axis=axis) - np.log(x.shape[axis])


def crb_position(network: Network, scenes: Scenes, priors: Priors) -> np.ndarray:
    """[S, 2, 2] Cramér-Rao bound on the east/north error covariance (unknown Ptx; true n and spread; a receiver
    that hears only noise tells nothing)."""
    heard = scenes.online.copy()
    if scenes.deaf is not None:
        rows = np.flatnonzero(scenes.deaf >= 0)
        heard[rows, scenes.deaf[rows]] = False
    return crb_at(network, scenes.east_m, scenes.north_m, heard, scenes.path_loss_exponent,
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
