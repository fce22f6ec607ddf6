"""The reference estimators: the grid posterior and the Cramér-Rao bound."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.lab.evaluation import GridPosterior, crb_position, evaluate
from heimdall_inference.core.network import Network, reference_network
from heimdall_inference.lab.simulator import Priors, Scenes, SignalConfig, simulate


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


@pytest.mark.slow
def test_evaluate_reports_every_figure(tmp_path):
    report = evaluate(scenes=24, seed=3, grid_step_m=5000.0)
    f = report.figures()
    assert f["scenes"] == 24
    for who in ("model", "grid_posterior"):
        assert f[who]["median_km"] > 0
        assert set(f[who]["coverage_pct"]) == {"0.68", "0.95"}
    assert 0 < f["ratios"]["cost_model_over_grid"] < 1
    assert "median error" in report.table()


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


def test_evaluate_reports_the_wide_world_against_its_own_grid_posterior(tmp_path, capsys):
    from heimdall_inference.cli import main

    wide, nominal = Priors.wide(), Priors.nominal()
    assert wide.margin_m == 2 * nominal.margin_m and wide.path_loss_exponent == (1.8, 4.2)
    assert wide.shadowing_db == (3.0, 10.0) and wide.tx_power_dbm == (20.0, 55.0) and wide.gain_error_db == 1.5
    out = tmp_path / "wide.json"
    assert main(["evaluate", "--world", "wide", "--scenes", "24", "--seed", "5", "--grid-step-m", "8000",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("world: wide") and "nan" not in text.split("cost ms per fix")[0]
    import json

    figures = json.loads(out.read_text())
    assert figures["world"] == "wide" and figures["scenes"] == 24
