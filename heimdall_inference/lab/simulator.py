"""RF scene simulator: what the receiver network hears from one transmitter.

Physics (every draw is per scene unless said otherwise; the ranges are :class:`Priors`' defaults):

* **Transmitter position**: uniform over the receivers' bounding box grown by ``margin_m`` (30 km)
  on every side, i.e. inside the network or up to ~30-90 km outside its hull, on the tangent plane
  at the network origin (see :mod:`heimdall_inference.core.network`).
* **Transmit power** (EIRP): uniform in [30, 50] dBm (1 W to 100 W); unknown to every estimator.
* **Path loss**: log-distance, ``PL(d) = FSPL(d0, f) + 10 n log10(d / d0)`` with ``d0`` = 1 km
  (``d`` is clipped below at ``d0``), ``FSPL(d0, f) = 20 log10(4 pi d0 f / c)`` and the exponent
  ``n`` uniform in [2.2, 3.8] (open terrain to cluttered hills).
* **Shadowing**: log-normal, i.e. Gaussian in dB, independent per receiver, with its standard
  deviation ``sigma`` drawn uniform in [4, 8] dB per scene.
* **Receiver gain error**: Gaussian, 1 dB standard deviation, independent per receiver and scene
  (calibration residual; the ``gain_db`` a payload carries is the *known* digital gain, removed).
* **Thermal noise**: complex white Gaussian, ``-174 dBm/Hz + 10 log10(sample_rate_hz) + NF`` with a
  noise figure of 8 dB (-125.2 dBm in 12 kHz), independent per receiver.
* **Signal**: narrowband FM, voice-like: a carrier offset uniform in +-500 Hz (plus a per-receiver
  local-oscillator error of 50 Hz rms), modulated by three tones in 300-2500 Hz with random
  amplitudes and a peak deviation uniform in [1, 2.5] kHz; each receiver sees its own carrier phase.
  Constant envelope, so the received signal power is exactly the link budget above.
* **Receivers online**: a uniform number in [3, 7], a uniform subset; the others send nothing.
* **Digitisation** (:mod:`codec`, applied by :func:`scene_payloads` and the training data): ``ci16`` receivers apply an AGC gain that puts the RMS level at -18 dBFS, report
  it as ``gain_db`` and quantise to int16 (full scale 32768); ``complex64`` receivers send float32 IQ
  at unit gain. Full scale ``|x| = 1`` stands for ``full_scale_dbm`` (the model metadata says which).

Everything is reproducible from a seed (numpy ``default_rng``). :func:`simulate` returns the truth
beside the IQ; :mod:`heimdall_inference.core.codec` turns a scene into a ``heimdall.iq/v1`` payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.network import Network
from ..core.types import IQ, FloatArray

__all__ = ["Priors", "WORLDS", "SignalConfig", "Scenes", "draw_scenes", "render_iq", "agc_gain_db", "simulate", "scene_payloads",
           "fspl_db", "noise_power_dbm", "SPEED_OF_LIGHT_M_S"]

SPEED_OF_LIGHT_M_S = 299_792_458.0


@dataclass(frozen=True, kw_only=True)
class Priors:
    """The simulator's priors; the grid posterior of :mod:`evaluation` marginalises the same ones."""

    margin_m: float = 30_000.0  #: transmitter region: receivers' bounding box grown by this much
    tx_power_dbm: tuple[float, float] = (30.0, 50.0)  #: uniform EIRP range
    path_loss_exponent: tuple[float, float] = (2.2, 3.8)  #: uniform per scene
    shadowing_db: tuple[float, float] = (4.0, 8.0)  #: uniform per scene: std of per-receiver shadowing
    gain_error_db: float = 1.0  #: std of the per-receiver calibration error
    reference_distance_m: float = 1000.0  #: d0 of the log-distance model
    noise_figure_db: float = 8.0  #: receiver noise figure
    center_freq_hz: tuple[float, float] = (144.0e6, 146.0e6)  #: uniform carrier frequency
    min_receivers: int = 3  #: fewest receivers online

    @classmethod
    def nominal(cls) -> "Priors":
        """The world the shipped model was trained on: the defaults above."""
        return cls()

    @classmethod
    def wide(cls) -> "Priors":
        """A harder world than the training priors (issue: honest uncertainty off the training distribution):
        transmitters up to 60 km outside the receivers' bounding box, path-loss exponents 1.8-4.2 (open water to
        dense clutter), shadowing 3-10 dB, calibration errors of 1.5 dB standard deviation (about +-3 dB at two
        sigma) and weaker transmitters, 20-55 dBm (100 mW handhelds to 300 W)."""
        return cls(margin_m=60_000.0, tx_power_dbm=(20.0, 55.0), path_loss_exponent=(1.8, 4.2),
                   shadowing_db=(3.0, 10.0), gain_error_db=1.5)

    def region(self, network: Network) -> tuple[float, float, float, float]:
        """(east_min, east_max, north_min, north_max) metres of the transmitter prior."""
        rx = network.receiver_enu()
        return (rx[:, 0].min() - self.margin_m, rx[:, 0].max() + self.margin_m,
                rx[:, 1].min() - self.margin_m, rx[:, 1].max() + self.margin_m)


WORLDS = {"nominal": Priors.nominal, "wide": Priors.wide}
"""``evaluate --world``: the priors of each world, by name."""


@dataclass(frozen=True, kw_only=True)
class SignalConfig:
    """What the receivers sample."""

    sample_rate_hz: float = 12_000.0
    snippet_s: float = 0.2
    full_scale_dbm: float = -10.0  #: power of a full-scale complex sample |x| = 1
    carrier_offset_hz: float = 500.0  #: +- range of the common carrier offset
    lo_error_hz: float = 50.0  #: rms per-receiver local oscillator error
    deviation_hz: tuple[float, float] = (1000.0, 2500.0)
    tone_hz: tuple[float, float] = (300.0, 2500.0)
    agc_target_dbfs: float = -18.0  #: ci16 receivers' RMS level after their AGC gain

    @property
    def snippet_samples(self) -> int:
        return int(round(self.snippet_s * self.sample_rate_hz))


@dataclass
class Scenes:
    """A batch of S scenes over a network of R receivers (the truth)."""

    east_m: FloatArray  #: [S]
    north_m: FloatArray  #: [S]
    lat: FloatArray  #: [S]
    lon: FloatArray  #: [S]
    tx_power_dbm: FloatArray  #: [S]
    path_loss_exponent: FloatArray  #: [S]
    shadowing_db: FloatArray  #: [S] std of this scene's shadowing
    center_freq_hz: FloatArray  #: [S]
    online: np.ndarray  #: [S, R] bool
    rx_power_dbm: FloatArray  #: [S, R] received signal power, incl. shadowing and gain error
    noise_power_dbm: float  #: thermal noise over the sampled band
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.east_m)

    def truth(self, i: int, network: Network) -> dict:
        """JSON-serialisable truth of scene ``i``."""
        ids = network.ids
        return {
            "lat": float(self.lat[i]), "lon": float(self.lon[i]),
            "east_m": float(self.east_m[i]), "north_m": float(self.north_m[i]),
            "tx_power_dbm": float(self.tx_power_dbm[i]),
            "path_loss_exponent": float(self.path_loss_exponent[i]),
            "shadowing_db": float(self.shadowing_db[i]),
            "center_freq_hz": float(self.center_freq_hz[i]),
            "online": [ids[r] for r in np.flatnonzero(self.online[i])],
            "rx_power_dbm": {ids[r]: float(self.rx_power_dbm[i, r]) for r in np.flatnonzero(self.online[i])},
            "noise_power_dbm": float(self.noise_power_dbm),
        }


def fspl_db(distance_m: FloatArray | float, freq_hz: FloatArray | float) -> FloatArray:
    """Free-space path loss 20 log10(4 pi d f / c) in dB."""
    return 20.0 * np.log10(4.0 * np.pi * np.asarray(distance_m) * np.asarray(freq_hz) / SPEED_OF_LIGHT_M_S)


def noise_power_dbm(sample_rate_hz: float, noise_figure_db: float) -> float:
    """Thermal noise over the sampled bandwidth: -174 dBm/Hz + 10 log10(B) + NF."""
    return -174.0 + 10.0 * np.log10(sample_rate_hz) + noise_figure_db


def mean_rx_power_dbm(distance_m: FloatArray, tx_power_dbm: FloatArray, exponent: FloatArray,
                      freq_hz: FloatArray, priors: Priors) -> FloatArray:
    """Median received power (no shadowing, no gain error) of the log-distance model."""
    d0 = priors.reference_distance_m
    d = np.maximum(distance_m, d0)
    return tx_power_dbm - fspl_db(d0, freq_hz) - 10.0 * exponent * np.log10(d / d0)


def draw_scenes(network: Network, priors: Priors, signal: SignalConfig, count: int,
                rng: np.random.Generator, *, n_online: int | None = None) -> Scenes:
    """Draw ``count`` scenes from the priors (positions, powers, channel, which receivers are online)."""
    r = len(network)
    e0, e1, n0, n1 = priors.region(network)
    east = rng.uniform(e0, e1, count)
    north = rng.uniform(n0, n1, count)
    lat, lon = network.to_geodetic(east, north)
    ptx = rng.uniform(*priors.tx_power_dbm, count)
    expo = rng.uniform(*priors.path_loss_exponent, count)
    sigma = rng.uniform(*priors.shadowing_db, count)
    freq = rng.uniform(*priors.center_freq_hz, count)
    rx = network.receiver_enu()
    dist = np.hypot(east[:, None] - rx[None, :, 0], north[:, None] - rx[None, :, 1])
    mean_db = mean_rx_power_dbm(dist, ptx[:, None], expo[:, None], freq[:, None], priors)
    shadow = rng.standard_normal((count, r)) * sigma[:, None]
    gain_err = rng.standard_normal((count, r)) * priors.gain_error_db
    k = (np.full(count, n_online) if n_online is not None
         else rng.integers(priors.min_receivers, r + 1, count))
    order = np.argsort(rng.random((count, r)), axis=1)
    online = np.zeros((count, r), bool)
    np.put_along_axis(online, order, np.arange(r)[None, :] < k[:, None], axis=1)
    return Scenes(east_m=east, north_m=north, lat=lat, lon=lon, tx_power_dbm=ptx, path_loss_exponent=expo,
                  shadowing_db=sigma, center_freq_hz=freq, online=online,
                  rx_power_dbm=mean_db + shadow + gain_err,
                  noise_power_dbm=noise_power_dbm(signal.sample_rate_hz, priors.noise_figure_db))


def render_iq(scenes: Scenes, signal: SignalConfig, rng: np.random.Generator) -> IQ:
    """[S, R, samples] complex64 IQ in full-scale units for every receiver (online or not)."""
    s, r = scenes.online.shape
    n = signal.snippet_samples
    fs = signal.sample_rate_hz
    t = (np.arange(n) / fs)[None, :]
    tones = rng.uniform(*signal.tone_hz, (s, 3))
    amps = rng.uniform(0.2, 1.0, (s, 3))
    amps /= amps.sum(axis=1, keepdims=True)
    tone_phase = rng.uniform(0, 2 * np.pi, (s, 3))
    deviation = rng.uniform(*signal.deviation_hz, s)
    # FM phase = 2 pi dev * integral of the message; for a tone a sin(2 pi f t + p) that is
    # -a dev / f cos(2 pi f t + p) (+ a constant folded into the carrier phase).
    phase = np.zeros((s, n))
    for j in range(3):
        phase -= (amps[:, j] * deviation / tones[:, j])[:, None] * np.cos(
            2 * np.pi * tones[:, j][:, None] * t + tone_phase[:, j][:, None])
    offset = rng.uniform(-signal.carrier_offset_hz, signal.carrier_offset_hz, s)[:, None] \
        + rng.standard_normal((s, r)) * signal.lo_error_hz
    carrier_phase = rng.uniform(0, 2 * np.pi, (s, r))
    total_phase = phase[:, None, :] + 2 * np.pi * offset[:, :, None] * t[None] + carrier_phase[:, :, None]
    fs_mw = 10.0 ** (signal.full_scale_dbm / 10.0)
    amp = np.sqrt(10.0 ** (scenes.rx_power_dbm / 10.0) / fs_mw)  # [S, R] full-scale amplitude
    noise_sigma = np.float32(np.sqrt(10.0 ** (scenes.noise_power_dbm / 10.0) / fs_mw / 2.0))
    iq = np.exp(1j * total_phase.astype(np.float32)).astype(np.complex64)
    iq *= amp[:, :, None].astype(np.float32)
    iq.real += rng.standard_normal((s, r, n), dtype=np.float32) * noise_sigma
    iq.imag += rng.standard_normal((s, r, n), dtype=np.float32) * noise_sigma
    return iq


def agc_gain_db(iq: IQ, target_dbfs: float) -> FloatArray:
    """Digital gain (dB, rounded to 0.1 dB) that brings each snippet's RMS to ``target_dbfs``."""
    p = np.mean(iq.real.astype(np.float64) ** 2 + iq.imag.astype(np.float64) ** 2, axis=-1)
    return np.round(target_dbfs - 10.0 * np.log10(np.maximum(p, 1e-30)), 1)


def simulate(network: Network, count: int, seed: int, *, priors: Priors | None = None,
             signal: SignalConfig | None = None, n_online: int | None = None) -> tuple[Scenes, IQ]:
    """Draw ``count`` scenes and render their IQ, reproducibly from ``seed``."""
    priors = priors or Priors()
    signal = signal or SignalConfig()
    rng = np.random.default_rng(seed)
    scenes = draw_scenes(network, priors, signal, count, rng, n_online=n_online)
    return scenes, render_iq(scenes, signal, rng)


def scene_payloads(scenes: Scenes, iq: IQ, network: Network, signal: SignalConfig, *, seed: int,
                   dtype: str = "mixed", binary: bool = False, captured_at: str = "2026-11-23T07:00:00.000Z",
                   request_prefix: str | None = "sim") -> list[dict]:
    """``heimdall.iq/v1`` payload dicts for every scene (online receivers only).

    ``dtype``: "ci16" (AGC gain, reported as gain_db), "complex64" (unit gain) or "mixed" (a fair
    coin per receiver). ``binary`` keeps raw bytes for msgpack; otherwise base64 text for JSON.
    """
    from ..core.codec import SCHEMA_IQ, encode_receiver

    if dtype not in ("ci16", "complex64", "mixed"):
        raise ValueError(f"dtype must be ci16, complex64 or mixed, not {dtype!r}")
    rng = np.random.default_rng([seed, 2])
    ids = network.ids
    out = []
    for i in range(len(scenes)):
        receivers = []
        for r in np.flatnonzero(scenes.online[i]):
            kind = dtype if dtype != "mixed" else ("ci16" if rng.random() < 0.5 else "complex64")
            gain = float(agc_gain_db(iq[i, r], signal.agc_target_dbfs)) if kind == "ci16" else 0.0
            receivers.append(encode_receiver(ids[r], iq[i, r], kind, gain_db=gain, binary=binary))
        payload = {"schema": SCHEMA_IQ, "captured_at": captured_at,
                   "center_freq_hz": float(scenes.center_freq_hz[i]), "sample_rate_hz": signal.sample_rate_hz,
                   "receivers": receivers}
        if request_prefix is not None:
            payload["request_id"] = f"{request_prefix}-{seed}-{i}"
        out.append(payload)
    return out
