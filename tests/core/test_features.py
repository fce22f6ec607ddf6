"""The feature plan keeps absolute power and follows the metadata."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.core.features import FeatureConfig, FeaturePlan, hz_to_mel, mel_filterbank


@pytest.fixture(scope="module")
def plan() -> FeaturePlan:
    return FeaturePlan(FeatureConfig(sample_rate_hz=12_000.0, snippet_samples=2400, full_scale_dbm=-10.0))


def _tone(freq_hz: float, power_dbfs: float, n: int = 2400) -> np.ndarray:
    t = np.arange(n) / 12_000.0
    return (10 ** (power_dbfs / 20) * np.exp(2j * np.pi * freq_hz * t)).astype(np.complex64)


def test_filterbank_is_a_partition_of_unity():
    offsets = np.fft.fftfreq(256, 1 / 12_000.0)
    fb = mel_filterbank(offsets, 32, 0.0, 6000.0)
    assert fb.shape == (32, 256)
    np.testing.assert_allclose(fb.sum(axis=0), 1.0, atol=1e-12)
    assert np.all(fb >= 0)
    # folded sidebands: +f and -f land in the same band
    np.testing.assert_array_equal(fb[:, 5], fb[:, -5])


def test_mel_scale_reference_point():
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, rel=2e-3)  # HTK: 1000 Hz ~ 1000 mel


@pytest.mark.parametrize("freq_hz", [0.0, 700.0, -2300.0, 5000.0])
def test_total_power_is_preserved_in_dbm(plan, freq_hz):
    mel = plan.mel_power_mw(_tone(freq_hz, -40.0))
    total_dbm = 10 * np.log10(mel.sum(axis=-1).mean())
    assert total_dbm == pytest.approx(-40.0 + -10.0, abs=0.05)  # dBFS + full-scale dBm


def test_absolute_power_survives_normalisation(plan):
    x = _tone(1000.0, -50.0)
    f1, f2 = plan(x), plan(x * np.float32(10 ** (10 / 20)))  # +10 dB
    assert f1.shape == (32, plan.config.frames) and f1.dtype == np.float32
    band = np.argmax(f1.mean(axis=1))
    assert f2[band].mean() - f1[band].mean() == pytest.approx(10.0 / plan.config.scale_db, abs=1e-3)


def test_vectorised_over_batch_and_receivers(plan):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 4, 2400)) + 1j * rng.standard_normal((3, 4, 2400))).astype(np.complex64) * 1e-3
    batch = plan(x)
    assert batch.shape == (3, 4, 32, plan.config.frames)
    np.testing.assert_allclose(batch[2, 1], plan(x[2, 1]), rtol=1e-5)


def test_wrong_length_and_config_errors(plan):
    with pytest.raises(ValueError):
        plan(np.zeros(100, np.complex64))
    with pytest.raises(ValueError):
        FeatureConfig.from_dict({"sample_rate_hz": 1.0, "snippet_samples": 10, "full_scale_dbm": 0.0, "bogus": 1})
    with pytest.raises(ValueError):
        FeaturePlan(FeatureConfig(sample_rate_hz=12_000.0, snippet_samples=100, full_scale_dbm=0.0))
