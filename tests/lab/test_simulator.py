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
