"""Simulated observations as the worker would see them, for training and evaluation.

The IQ goes through the same wire quantisation and gain removal as a payload (``codec``), and the
features through the same :class:`~heimdall_inference.core.features.FeaturePlan` the worker builds from
the model metadata: train/serve parity by construction, without base64 in the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.codec import iq_components, iq_from_components
from ..core.features import FeaturePlan
from ..core.network import Network
from .simulator import Priors, Scenes, SignalConfig, agc_gain_db, simulate
from ..core.types import IQ

__all__ = ["Observations", "digitize", "observe"]


@dataclass
class Observations:
    """S simulated scenes as the model sees them."""

    scenes: Scenes
    features: np.ndarray  #: [S, R, n_mels, frames] float32, zeros where a receiver is offline
    mask: np.ndarray  #: [S, R] float32
    target: np.ndarray  #: [S, 2] float32 true east/north metres


def digitize(iq: IQ, signal: SignalConfig, rng: np.random.Generator, ci16_share: float) -> tuple[IQ, np.ndarray, np.ndarray]:
    """Send every receiver's IQ through the wire: a ``ci16_share`` of them as AGC'd int16, the rest float32.

    Returns (decoded IQ [S, R, N], is_ci16 [S, R] bool, gain_db [S, R]).
    """
    is_ci16 = rng.random(iq.shape[:2]) < ci16_share
    gain = np.where(is_ci16, agc_gain_db(iq, signal.agc_target_dbfs), 0.0)
    out = iq_from_components(iq_components(iq, "complex64"), "complex64")
    if is_ci16.any():
        sel = iq[is_ci16]
        out[is_ci16] = iq_from_components(iq_components(sel, "ci16", gain[is_ci16]), "ci16", gain[is_ci16])
    return out, is_ci16, gain


def observe(network: Network, plan: FeaturePlan, count: int, seed: int, *, priors: Priors | None = None,
            signal: SignalConfig | None = None, ci16_share: float = 0.5) -> Observations:
    """Simulate ``count`` scenes and compute their features exactly as a worker would."""
    signal = signal or SignalConfig()
    scenes, iq = simulate(network, count, seed, priors=priors, signal=signal)
    rng = np.random.default_rng([seed, 1])
    decoded, _, _ = digitize(iq, signal, rng, ci16_share)
    feats = plan(decoded)
    mask = scenes.online.astype(np.float32)
    feats *= mask[:, :, None, None]
    target = np.stack([scenes.east_m, scenes.north_m], axis=1).astype(np.float32)
    return Observations(scenes=scenes, features=feats, mask=mask, target=target)
