"""Train/serve parity: training features are exactly what the worker computes from the payloads."""

from __future__ import annotations

import numpy as np

from heimdall_inference.lab.dataset import digitize, observe
from heimdall_inference.lab.simulator import SignalConfig, scene_payloads, simulate


def test_training_features_equal_the_pipelines_for_float_payloads(localizer, spec):
    obs = observe(spec.network, localizer.plan, 12, seed=5, ci16_share=0.0)
    scenes, iq = simulate(spec.network, 12, 5)
    docs = scene_payloads(scenes, iq, spec.network, SignalConfig(), seed=5, dtype="complex64", binary=True)
    decoded = [localizer.decode(d) for d in docs]
    est = localizer.estimate(decoded)
    mean, params = localizer.session.run(obs.features, obs.mask)
    np.testing.assert_allclose(est.mean_enu, mean, rtol=1e-4, atol=1.0)
    np.testing.assert_array_equal(obs.mask, scenes.online.astype(np.float32))
    np.testing.assert_allclose(obs.target[:, 0], scenes.east_m, rtol=1e-6)


def test_ci16_digitisation_matches_the_wire(spec):
    rng = np.random.default_rng(0)
    scenes, iq = simulate(spec.network, 4, 9)
    out, is_ci16, gain = digitize(iq, SignalConfig(), rng, ci16_share=1.0)
    assert is_ci16.all() and np.all(gain != 0)
    lsb = 10 ** (-gain / 20) / 32768
    assert np.all(np.abs(out - iq).max(axis=-1) <= lsb * 0.71)  # rounding of I and Q: half an LSB each
