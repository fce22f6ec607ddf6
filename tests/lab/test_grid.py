"""The reference estimators: the grid posterior (its fault hypotheses, its quadrature for censored receivers) and
the Cramér-Rao bound."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_ndtr, logsumexp

from heimdall_inference.core.network import Network, reference_network
from heimdall_inference.lab.grid import GridPosterior, crb_position
from heimdall_inference.lab.simulator import Priors, Scenes, SignalConfig, fspl_db, simulate


def test_crb_matches_the_closed_form_for_a_symmetric_square():
    a = 20_000.0
    net = Network.from_dict({"name": "square", "origin": {"lat": 45.0, "lon": 8.0}, "receivers": [
        {"id": "e", "lat": 45.0, "lon": 8.0}, {"id": "w", "lat": 45.0, "lon": 8.0},
        {"id": "n", "lat": 45.0, "lon": 8.0}, {"id": "s", "lat": 45.0, "lon": 8.0}]})
    pos = np.array([[a, 0.0], [-a, 0.0], [0.0, a], [0.0, -a]])
    lat, lon = net.to_geodetic(pos[:, 0], pos[:, 1])
    net = Network.from_dict({"name": "square", "origin": {"lat": 45.0, "lon": 8.0}, "receivers": [
        {"id": i, "lat": float(la), "lon": float(lo)} for i, la, lo in zip("ewns", lat, lon)]})
    pr = Priors(gain_error_db=0.0)
    sc = Scenes(east_m=np.array([0.0]), north_m=np.array([0.0]), lat=np.array([45.0]), lon=np.array([8.0]),
                tx_power_dbm=np.array([40.0]), path_loss_exponent=np.array([3.0]), shadowing_db=np.array([6.0]),
                center_freq_hz=np.array([145e6]), online=np.ones((1, 4), bool), rx_power_dbm=np.zeros((1, 4)),
                noise_power_dbm=-125.0)
    crb = crb_position(net, sc, pr)[0]
    k = 10 * 3.0 / np.log(10)
    expected = a * a * 36.0 / (2 * k * k)  # J = diag(2k^2/(a^2 s^2), 2k^2/(a^2 s^2), 4/s^2)
    np.testing.assert_allclose(crb, np.diag([expected, expected]), rtol=1e-3, atol=1.0)


def test_co_located_receivers_leave_position_unidentifiable():
    net = reference_network()
    sc, _ = simulate(net, 1, seed=1, n_online=3)
    sc.online[:] = False
    sc.online[0, [net.index["giaveno"], net.index["coazze"], net.index["torino"]]] = True
    assert np.isinf(np.diag(crb_position(net, sc, Priors())[0])).all()


def test_grid_posterior_finds_a_transmitter_when_shadowing_is_small():
    net = reference_network()
    pr = Priors(shadowing_db=(0.5, 0.6), gain_error_db=0.2, margin_m=0.0)
    sig = SignalConfig()
    sc, iq = simulate(net, 4, seed=12, priors=pr, signal=sig, n_online=7)
    grid = GridPosterior(net, pr, sig, grid_step_m=1000.0, spreads=2, exponents=33)
    for i in range(len(sc)):
        y, var_m, cen = grid.observe(iq[i], sig.full_scale_dbm)
        res = grid.posterior(np.arange(7), y, var_m, cen, float(sc.center_freq_hz[i]),
                             truth=np.array([sc.east_m[i], sc.north_m[i]]))
        err = np.hypot(res.mean[0] - sc.east_m[i], res.mean[1] - sc.north_m[i])
        spread = np.sqrt(np.trace(res.cov))
        # transmit power and exponent stay unknown, so even 0.5 dB shadowing leaves kilometres
        assert spread < 15_000.0 and err < 3 * spread, (i, err, spread)
        assert 0.0 <= res.hpd_mass_at <= 1.0


def test_grid_posterior_handles_a_receiver_below_the_noise():
    net = reference_network()
    pr, sig = Priors(), SignalConfig()
    grid = GridPosterior(net, pr, sig, grid_step_m=5000.0, exponents=5, spreads=3)
    rng = np.random.default_rng(0)
    iq = np.zeros((3, 2400), np.complex64)
    sigma = np.sqrt(10 ** ((grid.noise_mw and -125.2) / 10) / 10 ** (sig.full_scale_dbm / 10) / 2)
    iq += (rng.standard_normal((3, 2400)) + 1j * rng.standard_normal((3, 2400))).astype(np.complex64) * sigma
    iq[0] += np.float32(10 ** ((-80 - sig.full_scale_dbm) / 20))  # one strong receiver, two hear only noise
    y, var_m, cen = grid.observe(iq, sig.full_scale_dbm)
    assert cen.tolist() == [False, True, True]
    res = grid.posterior(np.array([net.index["torino"], net.index["genova"], net.index["milano"]]), y, var_m, cen,
                         145.5e6)
    rx = net.receiver_enu()
    # heard loudly at torino, not at all at genova and milano: the posterior sits near torino
    assert np.hypot(*(res.mean - rx[net.index["torino"]])) < np.hypot(*(res.mean - rx[net.index["genova"]]))


def test_the_grid_posterior_is_finite_when_no_receiver_hears_the_transmitter():
    """A weak transmitter far outside the network (the wide world): every receiver censored. The posterior used to
    divide by the uncensored receivers' total weight, zero here, and returned NaN."""
    net = reference_network()
    priors = Priors.wide()
    grid = GridPosterior(net, priors, SignalConfig(), grid_step_m=8000.0)
    slots = np.arange(4)
    res = grid.posterior(slots, np.full(4, -140.0), np.full(4, 0.5), np.ones(4, bool), 145e6)
    assert np.isfinite(res.mean).all() and np.isfinite(res.cov).all()
    rx = net.receiver_enu()[slots]
    # nothing heard anywhere: the posterior leans away from the receivers that would have heard it
    assert np.hypot(*(res.mean - rx.mean(axis=0))) > 20_000


def test_the_hypotheses_of_each_world():
    net = reference_network()
    cen = np.array([False, True, False, True])
    nominal = GridPosterior(net, Priors.nominal(), SignalConfig(), grid_step_m=20_000.0)
    extra, keep, logp = nominal.hypotheses(cen)
    assert extra.shape == (1, 4) and keep.all() and logp.tolist() == [0.0]
    wide = GridPosterior(net, Priors.wide(), SignalConfig(), grid_step_m=20_000.0)
    extra, keep, logp = wide.hypotheses(cen)
    # sound; each of the 4 receivers miscalibrated; each of the 2 censored ones deaf
    assert len(logp) == 1 + 4 + 2 and np.exp(logp).sum() == pytest.approx(1 - 0.15 + 0.15 * 4 / 4 - 0.05 * 2 / 4)
    assert (extra[1:5] == np.eye(4) * 100.0).all() and keep[:5].all()
    assert keep[5].tolist() == [True, False, True, True] and keep[6].tolist() == [True, True, True, False]


def _brute_force(grid, slots, y, var_m, cen, freq):
    """The posterior mean on the same cells with the power marginalised on a fine grid (0.05 dB) instead of by
    quadrature: the reference the quadrature is checked against (one hypothesis: a world without faults)."""
    pr = grid.priors
    powers = np.arange(pr.tx_power_dbm[0] + 0.025, pr.tx_power_dbm[1], 0.05)
    thresh = 10 * np.log10(grid.detect_snr * grid.noise_mw)
    logw = np.full(len(grid.cells), -np.inf)
    for spread in grid.spreads:
        var = spread ** 2 + pr.gain_error_db ** 2 + var_m
        for expo in grid.exponents:
            mu = powers[None, :, None] - (fspl_db(pr.reference_distance_m, freq) + 10 * expo * grid.log_d[:, slots])[:, None, :]
            ll = np.where(cen, log_ndtr((thresh - mu) / np.sqrt(var)),
                          -0.5 * (y - mu) ** 2 / var - 0.5 * np.log(var)).sum(axis=2)
            logw = np.logaddexp(logw, logsumexp(ll, axis=1))
    w = np.exp(logw - logw.max())
    return (w / w.sum()) @ grid.cells


def test_the_quadrature_over_transmit_power_matches_a_fine_grid_where_receivers_are_censored():
    net = reference_network()
    pr, sig = Priors(margin_m=60_000.0, tx_power_dbm=(20.0, 55.0)), SignalConfig()
    sc, iq = simulate(net, 200, seed=5, priors=pr, signal=sig)
    grid = GridPosterior(net, pr, sig, grid_step_m=12_000.0, exponents=5, spreads=3)
    checked = 0
    for i in range(len(sc)):
        on = np.flatnonzero(sc.online[i])
        y, v, c = grid.observe(iq[i, on], sig.full_scale_dbm)
        if not c.any() or c.all():
            continue
        fast = grid.posterior(on, y, v, c, float(sc.center_freq_hz[i])).mean
        slow = _brute_force(grid, on, y, v, c, float(sc.center_freq_hz[i]))
        assert np.hypot(*(fast - slow)) < 200.0, (i, fast, slow)  # metres, on posteriors tens of km wide
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_the_fault_hypotheses_discount_a_badly_miscalibrated_receiver():
    """Seven receivers, little shadowing, one reading 25 dB high: the posterior that knows receivers can be badly
    miscalibrated stays near the transmitter; the one that does not is pulled toward the outlier."""
    net = reference_network()
    sig = SignalConfig()
    clean = Priors(shadowing_db=(1.0, 1.2), gain_error_db=0.3, margin_m=0.0)
    faulty = Priors(shadowing_db=(1.0, 1.2), gain_error_db=0.3, margin_m=0.0, miscalibrated_share=0.1,
                    miscalibration_db=15.0)
    sc, iq = simulate(net, 6, seed=33, priors=clean, signal=sig, n_online=7)
    naive = GridPosterior(net, clean, sig, grid_step_m=3000.0, spreads=2, exponents=9)
    robust = GridPosterior(net, faulty, sig, grid_step_m=3000.0, spreads=2, exponents=9)
    wins = 0
    for i in range(len(sc)):
        x = iq[i].copy()
        far = int(np.argmax(np.hypot(*(net.receiver_enu() - [sc.east_m[i], sc.north_m[i]]).T)))
        x[far] *= np.float32(10 ** (25 / 20))
        truth = np.array([sc.east_m[i], sc.north_m[i]])
        y, v, c = naive.observe(x, sig.full_scale_dbm)
        slots = np.arange(7)
        e_naive = np.hypot(*(naive.posterior(slots, y, v, c, float(sc.center_freq_hz[i])).mean - truth))
        e_robust = np.hypot(*(robust.posterior(slots, y, v, c, float(sc.center_freq_hz[i])).mean - truth))
        wins += e_robust < e_naive
    assert wins >= 5, wins
