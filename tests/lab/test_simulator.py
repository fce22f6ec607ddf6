"""The simulator's physics, reproducibility and payloads."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.core.network import reference_network
from heimdall_inference.lab.simulator import Priors, SignalConfig, fspl_db, noise_power_dbm, scene_payloads, simulate


@pytest.fixture(scope="module")
def net():
    return reference_network()


def test_reproducible_from_seed(net):
    a, iq_a = simulate(net, 5, seed=9)
    b, iq_b = simulate(net, 5, seed=9)
    np.testing.assert_array_equal(iq_a, iq_b)
    np.testing.assert_array_equal(a.rx_power_dbm, b.rx_power_dbm)
    c, _ = simulate(net, 5, seed=10)
    assert not np.allclose(a.east_m, c.east_m)


def test_draws_respect_the_priors(net):
    pr = Priors()
    sc, _ = simulate(net, 400, seed=1)
    e0, e1, n0, n1 = pr.region(net)
    assert np.all((sc.east_m >= e0) & (sc.east_m <= e1) & (sc.north_m >= n0) & (sc.north_m <= n1))
    assert np.all((sc.tx_power_dbm >= 30) & (sc.tx_power_dbm <= 50))
    assert np.all((sc.path_loss_exponent >= 2.2) & (sc.path_loss_exponent <= 3.8))
    k = sc.online.sum(axis=1)
    assert k.min() == 3 and k.max() == 7
    assert set(np.unique(k)) == {3, 4, 5, 6, 7}


def test_iq_power_is_the_link_budget_plus_noise(net):
    sig = SignalConfig()
    sc, iq = simulate(net, 30, seed=4, signal=sig)
    p_dbm = 10 * np.log10(np.mean(np.abs(iq.astype(np.complex128)) ** 2, axis=-1)) + sig.full_scale_dbm
    expected = 10 * np.log10(10 ** (sc.rx_power_dbm / 10) + 10 ** (sc.noise_power_dbm / 10))
    np.testing.assert_allclose(p_dbm, expected, atol=0.3)


def test_path_loss_and_noise_formulas():
    assert fspl_db(1000.0, 145.5e6) == pytest.approx(75.7, abs=0.05)
    assert noise_power_dbm(12_000.0, 8.0) == pytest.approx(-125.2, abs=0.05)


def test_the_nbfm_signal_is_narrowband(net):
    sc, iq = simulate(net, 1, seed=2, n_online=7)
    strongest = np.argmax(sc.rx_power_dbm[0])
    spec = np.abs(np.fft.fftshift(np.fft.fft(iq[0, strongest]))) ** 2
    freqs = np.fft.fftshift(np.fft.fftfreq(iq.shape[-1], 1 / 12_000.0))
    inside = np.abs(freqs) <= 500 + 2500 + 2 * 2500
    assert spec[inside].sum() / spec.sum() > 0.95


def test_payloads_carry_only_online_receivers_and_truth(net):
    sig = SignalConfig()
    sc, iq = simulate(net, 3, seed=8)
    docs = scene_payloads(sc, iq, net, sig, seed=8, dtype="ci16")
    for i, doc in enumerate(docs):
        assert doc["schema"] == "heimdall.iq/v1"
        ids = [r["id"] for r in doc["receivers"]]
        assert ids == sc.truth(i, net)["online"]
        assert all(r["iq"]["dtype"] == "ci16" and "gain_db" in r for r in doc["receivers"])
    with pytest.raises(ValueError):
        scene_payloads(sc, iq, net, sig, seed=8, dtype="cu8")


def test_the_worlds_and_bands(net):
    nominal, wide = Priors.nominal(), Priors.wide()
    assert nominal == Priors() and not nominal.faults and wide.faults and wide.world == "wide"
    assert wide.margin_m == nominal.margin_m and wide.hull_margin_m == 60_000.0 and wide.path_loss_exponent == (1.8, 4.2)
    assert wide.shadowing_db == (3.0, 10.0) and wide.tx_power_dbm == (20.0, 55.0) and wide.gain_error_db == 1.5
    uhf = Priors.nominal("70cm")
    assert uhf.center_freq_hz == (430e6, 440e6) and uhf.noise_figure_db == 6.0 and uhf.path_loss_exponent == (2.4, 4.0)
    assert Priors.preset("wide", "70cm").path_loss_exponent == (2.0, 4.4)
    # free-space loss at 1 km grows by 20 log10 of the frequency ratio: 9.5 dB from 145 to 435 MHz
    assert fspl_db(1000.0, 435e6) - fspl_db(1000.0, 145e6) == pytest.approx(9.54, abs=0.01)
    assert noise_power_dbm(12_000.0, uhf.noise_figure_db) == pytest.approx(-127.2, abs=0.05)
    sc, _ = simulate(net, 200, seed=3, priors=uhf)
    assert np.all((sc.center_freq_hz >= 430e6) & (sc.center_freq_hz <= 440e6)) and sc.miscalibrated is None
    with pytest.raises(ValueError):
        Priors.preset("wide", "6m")


def test_the_wide_world_has_faulty_receivers_in_its_shares(net):
    n = 6000
    sc, _ = simulate(net, n, seed=21, priors=Priors.wide())
    bad, deaf = sc.miscalibrated >= 0, sc.deaf >= 0
    for share, seen in ((0.10, bad.mean()), (0.05, deaf.mean())):
        assert abs(seen - share) < 4 * np.sqrt(share * (1 - share) / n), (share, seen)
    assert not (bad & deaf).any()  # at most one faulty receiver per scene
    rows = np.flatnonzero(bad)
    assert sc.online[rows, sc.miscalibrated[rows]].all()
    rows = np.flatnonzero(deaf)
    assert sc.online[rows, sc.deaf[rows]].all() and np.isneginf(sc.rx_power_dbm[rows, sc.deaf[rows]]).all()


def test_a_deaf_receiver_sends_only_noise(net):
    sig = SignalConfig()
    sc, iq = simulate(net, 400, seed=8, priors=Priors.wide(), signal=sig)
    i = int(np.flatnonzero(sc.deaf >= 0)[0])
    r = int(sc.deaf[i])
    p_dbm = 10 * np.log10(np.mean(np.abs(iq[i, r].astype(np.complex128)) ** 2)) + sig.full_scale_dbm
    assert p_dbm == pytest.approx(sc.noise_power_dbm, abs=0.3)
    truth = sc.truth(i, net)
    assert truth["deaf"] == net.ids[r] and truth["rx_power_dbm"][net.ids[r]] is None
    import json

    json.dumps(truth)  # JSON-serialisable, no -inf


def test_the_wide_world_reaches_60_km_outside_the_hull_and_holds_the_nominal_box(net):
    from heimdall_inference.core.quality import hull_distances_m

    wide, nominal = Priors.wide(), Priors.nominal()
    sc, _ = simulate(net, 3000, seed=31, priors=wide)
    rx = net.receiver_enu()
    out = hull_distances_m(rx, np.stack([sc.east_m, sc.north_m], axis=1))
    in_box = nominal.contains(net, sc.east_m, sc.north_m)
    assert np.all(in_box | (out <= 60_000.0 + 1e-6)) and wide.contains(net, sc.east_m, sc.north_m).all()
    assert 0.18 < (~in_box).mean() < 0.30 and out.max() > 55_000.0  # a quarter outside the nominal box
    # the nominal box is inside the wide world: every nominal draw is a wide one
    nom, _ = simulate(net, 500, seed=32, priors=nominal)
    assert wide.contains(net, nom.east_m, nom.north_m).all()
    # uniform over the region: as many draws per km2 inside the box as outside it
    e0, e1, n0, n1 = wide.region(net)
    grid = np.stack(np.meshgrid(np.linspace(e0, e1, 300), np.linspace(n0, n1, 300)), -1).reshape(-1, 2)
    inside_wide = wide.contains(net, grid[:, 0], grid[:, 1])
    share_box_area = nominal.contains(net, grid[:, 0], grid[:, 1]).sum() / inside_wide.sum()
    assert abs(in_box.mean() - share_box_area) < 4 * np.sqrt(share_box_area * (1 - share_box_area) / 3000)
