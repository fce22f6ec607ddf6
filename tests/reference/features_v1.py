"""The feature plan before the fast paths (frozen; tests only): the reference for tests/core/test_parity.py.

The plan is the model's feature contract made executable: STFT (``scipy.signal.stft``, two-sided,
since IQ is complex), per-bin power scaled so that the bins of a frame sum to the frame's mean power,
a mel filterbank over the absolute offset from the centre frequency, dBm, then *fixed* normalisation
constants from training. No per-sample z-scoring: absolute received power is the localisation signal.

The mel filterbank folds the two sidebands (power at -f and +f lands in the same band) and spaces the
bands on the mel scale from ``fmin_hz`` to ``fmax_hz``: fine bands near the carrier, where a
narrowband signal's energy is, coarse bands at the edges, where mostly noise is. Its triangles are a
partition of unity over the bins (each bin's weights sum to 1), so the mel powers of a frame add up
to the frame's total power and the features keep absolute power exactly. (librosa's filterbank would
drag numba into the worker's import path; the construction is a few lines of numpy.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.signal

from heimdall_inference.core.types import IQ, Features

__all__ = ["FeatureConfig", "FeaturePlan", "hz_to_mel", "mel_filterbank"]


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """The feature section of the model metadata."""

    sample_rate_hz: float
    snippet_samples: int
    full_scale_dbm: float  #: power (dBm) of a full-scale complex sample |x| = 1
    n_fft: int = 256
    hop: int = 128
    window: str = "hann"
    n_mels: int = 32
    fmin_hz: float = 0.0
    fmax_hz: float | None = None  #: defaults to the Nyquist offset, sample_rate_hz / 2
    floor_dbm: float = -160.0  #: added in the linear domain before the log, keeps log finite
    offset_db: float = -120.0  #: fixed normalisation: (dBm - offset_db) / scale_db
    scale_db: float = 20.0

    @property
    def frames(self) -> int:
        return 1 + (self.snippet_samples - self.n_fft) // self.hop

    @classmethod
    def from_dict(cls, doc: dict) -> "FeatureConfig":
        fields = cls.__dataclass_fields__
        unknown = set(doc) - set(fields)
        if unknown:
            raise ValueError(f"unknown feature settings: {sorted(unknown)}")
        return cls(**doc)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def hz_to_mel(f_hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(f_hz, float) / 700.0)


def mel_filterbank(offsets_hz: np.ndarray, n_mels: int, fmin_hz: float, fmax_hz: float) -> np.ndarray:
    """[n_mels, bins] triangular weights over |offset|, a partition of unity over the bins."""
    centres = np.linspace(hz_to_mel(fmin_hz), hz_to_mel(fmax_hz), n_mels)
    m = hz_to_mel(np.abs(offsets_hz))
    eye = np.eye(n_mels)
    return np.stack([np.interp(m, centres, eye[j]) for j in range(n_mels)])


class FeaturePlan:
    """A reusable, vectorised IQ -> feature transform; build once per process."""

    def __init__(self, config: FeatureConfig) -> None:
        if config.snippet_samples < config.n_fft:
            raise ValueError("snippet shorter than one FFT frame")
        self.config = config
        window = scipy.signal.get_window(config.window, config.n_fft)
        self._window = window
        offsets = np.fft.fftfreq(config.n_fft, d=1.0 / config.sample_rate_hz)
        fmax = config.fmax_hz if config.fmax_hz is not None else config.sample_rate_hz / 2
        fb = mel_filterbank(offsets, config.n_mels, config.fmin_hz, fmax)
        # stft(scaling="spectrum") returns FFT(x w) / sum(w); rescale |Z|^2 so that the bins of a
        # frame sum to the frame's mean power (Parseval with the window's energy), then to mW.
        power_scale = window.sum() ** 2 / (config.n_fft * np.sum(window**2))
        mw_per_fs = 10.0 ** (config.full_scale_dbm / 10.0)
        self._bank_t = (fb.T * (power_scale * mw_per_fs)).astype(np.float32)  # [bins, n_mels]
        self._floor_mw = np.float32(10.0 ** (config.floor_dbm / 10.0))

    @property
    def shape(self) -> tuple[int, int]:
        """(n_mels, frames) of one receiver's features."""
        return self.config.n_mels, self.config.frames

    def mel_power_mw(self, iq: IQ) -> np.ndarray:
        """[..., samples] complex -> [..., frames, n_mels] mel-band power in mW (float32)."""
        c = self.config
        if iq.shape[-1] != c.snippet_samples:
            raise ValueError(f"expected {c.snippet_samples} samples, got {iq.shape[-1]}")
        _, _, z = scipy.signal.stft(
            np.asarray(iq, np.complex64), fs=c.sample_rate_hz, window=self._window, nperseg=c.n_fft,
            noverlap=c.n_fft - c.hop, return_onesided=False, boundary=None, padded=False,
            axis=-1, scaling="spectrum",
        )
        z = np.swapaxes(z, -1, -2)  # [..., frames, bins]
        power = z.real * z.real + z.imag * z.imag
        return power @ self._bank_t

    def __call__(self, iq: IQ) -> Features:
        """[..., samples] complex full-scale IQ -> [..., n_mels, frames] normalised log-mel (float32)."""
        c = self.config
        mel = self.mel_power_mw(iq)
        db = 10.0 * np.log10(mel + self._floor_mw)
        feats = (db - np.float32(c.offset_db)) * np.float32(1.0 / c.scale_db)
        return np.ascontiguousarray(np.swapaxes(feats, -1, -2), dtype=np.float32)
