"""IQ -> normalised log-mel power features, built from the model's metadata (the model contract).

The plan is the model's feature contract made executable: a two-sided STFT (IQ is complex; the frames of
every receiver of a batch, windowed, in one ``scipy.fft`` call), per-bin power scaled so that the bins of a
frame sum to the frame's mean power, a mel filterbank over the absolute offset from the centre frequency,
dBm, then *fixed* normalisation constants from training. No per-sample z-scoring: absolute received power
is the localisation signal.

It runs near the FFT's own speed, in float32 throughout: the frames are a strided view of the IQ (no copy
until the window multiplies them into the FFT's buffer), the FFT works in place, and the power and the
mel projection are one matrix product: the squares of the interleaved real and imaginary parts times the
filterbank with each bin's weight on both rows (``|z|^2 = re^2 + im^2``), the STFT's scaling folded in.
The result equals ``scipy.signal.stft``'s within float32 rounding (tests/core/test_parity.py).

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
import scipy.fft
import scipy.signal

from .types import IQ, Features

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
        # the same, for the squares of FFT(x w) itself ([re0^2, im0^2, re1^2, ...] rows): 1 / sum(w)^2 folded in
        raw = fb.T * (power_scale * mw_per_fs / window.sum() ** 2)
        self._bank_sq = np.repeat(raw, 2, axis=0).astype(np.float32)  # [2 bins, n_mels]
        self._window_iq = np.repeat(window, 2).astype(np.float32)  # [2 n_fft]: each weight on its I and its Q
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
        lead = iq.shape[:-1]
        x = np.ascontiguousarray(iq, np.complex64).reshape(-1, c.snippet_samples).view(np.float32)  # I, Q interleaved
        frames = np.lib.stride_tricks.sliding_window_view(x, 2 * c.n_fft, axis=-1)[:, ::2 * c.hop, :]  # a view
        buf = np.empty((x.shape[0], c.frames, c.n_fft), np.complex64)
        np.multiply(frames, self._window_iq, out=buf.view(np.float32))  # real products: the window is real
        z = scipy.fft.fft(buf, axis=-1, workers=1, overwrite_x=True)
        sq = z.view(np.float32).reshape(-1, 2 * c.n_fft)
        np.square(sq, out=sq)
        return (sq @ self._bank_sq).reshape(*lead, c.frames, c.n_mels)

    def frames_last(self, iq: IQ) -> Features:
        """[..., samples] -> [..., frames, n_mels] normalised log-mel (float32): the features with their last two axes
        swapped (:meth:`__call__` gives the contract's order; a caller that copies them anyway takes this)."""
        c = self.config
        out = self.mel_power_mw(iq)
        out += self._floor_mw
        np.log10(out, out=out)
        out *= np.float32(10.0 / c.scale_db)
        out -= np.float32(c.offset_db / c.scale_db)
        return out

    def __call__(self, iq: IQ) -> Features:
        """[..., samples] complex full-scale IQ -> [..., n_mels, frames] normalised log-mel (float32)."""
        return np.ascontiguousarray(np.swapaxes(self.frames_last(iq), -1, -2), dtype=np.float32)
