"""Array aliases shared by the package (shapes are documented where the arrays are made)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["IQ", "FloatArray", "Features", "Mask"]

IQ = NDArray[np.complex64]
"""Complex baseband samples in full-scale units (|x| = 1 is the model's ``full_scale_dbm``)."""

FloatArray = NDArray[np.float64]
"""Generic float64 array (positions in metres, powers in dB)."""

Features = NDArray[np.float32]
"""Normalised log-mel features, [batch, receivers, n_mels, frames]."""

Mask = NDArray[np.float32]
"""Receiver presence, [batch, receivers]: 1.0 online, 0.0 absent."""
