"""RF scene simulator: what the receiver network hears from one transmitter.

Physics (every draw is per scene unless said otherwise; the ranges are the 2 m band's nominal world,
:meth:`Priors.nominal`; :data:`WORLDS` and :data:`BANDS` list the others):

* **Transmitter position**: uniform over the receivers' bounding box grown by ``margin_m`` (30 km)
  on every side, i.e. inside the network or up to ~30-100 km outside its hull (half of them within 19 km
  of it), on the tangent plane at the network origin (see :mod:`heimdall_inference.core.network`); a
  world may add every point within ``hull_margin_m`` of the receivers' convex hull to that box.
* **Transmit power** (EIRP): uniform in [30, 50] dBm (1 W to 100 W); unknown to every estimator.
* **Path loss**: log-distance, ``PL(d) = FSPL(d0, f) + 10 n log10(d / d0)`` with ``d0`` = 1 km
  (``d`` is clipped below at ``d0``), ``FSPL(d0, f) = 20 log10(4 pi d0 f / c)`` and the exponent
  ``n`` uniform in [2.2, 3.8] (open terrain to cluttered hills).
* **Shadowing**: log-normal, i.e. Gaussian in dB, independent per receiver, with its standard
  deviation ``sigma`` drawn uniform in [4, 8] dB per scene.
* **Receiver gain error**: Gaussian, 1 dB standard deviation, independent per receiver and scene
  (calibration residual; the ``gain_db`` a payload carries is the *known* digital gain, removed).
* **Faulty receivers** (none in the nominal worlds): in a share ``miscalibrated_share`` of scenes one
  online receiver (uniform among them) is badly miscalibrated, its gain off by a further
  Gaussian error of ``miscalibration_db`` (10 dB) standard deviation (a wrong attenuator setting, a
  preamplifier switched off, a damaged feed line); in a further, disjoint share ``deaf_share`` one
  online receiver hears only its own noise (antenna disconnected, feed line open): it still sends a
  snippet, with no signal in it. At most one faulty receiver per scene.
* **Thermal noise**: complex white Gaussian, ``-174 dBm/Hz + 10 log10(sample_rate_hz) + NF`` with an
  effective noise figure of 8 dB at 2 m (-125.2 dBm in 12 kHz), independent per receiver.
* **Signal**: narrowband FM, voice-like: a carrier offset uniform in +-500 Hz (plus a per-receiver
  local-oscillator error of 50 Hz rms), modulated by three tones in 300-2500 Hz with random
  amplitudes and a peak deviation uniform in [1, 2.5] kHz; each receiver sees its own carrier phase.
  Constant envelope, so the received signal power is exactly the link budget above.
* **Receivers online**: a uniform number in [3, 7], a uniform subset; the others send nothing.
* **Digitisation** (:mod:`codec`, applied by :func:`scene_payloads` and the training data): ``ci16`` receivers apply an AGC gain that puts the RMS level at -18 dBFS, report
  it as ``gain_db`` and quantise to int16 (full scale 32768); ``complex64`` receivers send float32 IQ
  at unit gain. Full scale ``|x| = 1`` stands for ``full_scale_dbm`` (the model metadata says which).

**The two bands** (:data:`BANDS`; the receivers listen on both, through the same front end and feature
plan). What changes with frequency, and why:

* 2 m, 144-146 MHz: as above. The effective noise figure of 8 dB is the receiver's (~3-5 dB with its
  feed line) raised by external noise: ITU-R P.372 puts galactic noise at about 2 dB and rural man-made
  noise at about 7 dB above kTB at 145 MHz.
* 70 cm, 430-440 MHz: free-space loss at 1 km is 9.5 dB higher (20 log10 of the frequency ratio, from
  the formula, not a setting); diffraction over terrain and clutter loss grow with frequency, so the
  exponent is drawn from [2.4, 4.0] and the shadowing spread from [5, 9] dB; external noise falls
  below the receiver's own (P.372: galactic about -9 dB, rural man-made about -6 dB above kTB at
  435 MHz) while feed-line loss grows, so the effective noise figure is 6 dB (-127.2 dBm in 12 kHz).
  Transmit powers are the same as at 2 m (handhelds to mobiles).

**The two worlds** (:data:`WORLDS`): *nominal*, the priors above; *wide*, harder than the nominal
priors on every axis: transmitters also anywhere up to 60 km outside the receivers' convex hull (the
nominal box, which reaches up to 100 km out at its corners, stays in: a quarter of the wide world's
transmitters lie outside it, 6 % more than 60 km from the hull), exponents 0.4
wider on each side (1.8-4.2 at 2 m), shadowing spreads 1 dB lower and 2 dB higher (3-10 dB at 2 m),
calibration errors of 1.5 dB standard deviation (about +-3 dB at two sigma), transmit powers of 20-55 dBm
(100 mW handhelds to 300 W), and faulty receivers: one badly miscalibrated in 10 % of scenes, one
hearing only noise in 5 %.

Everything is reproducible from a seed (numpy ``default_rng``); the nominal worlds draw nothing for
faults, so their scenes are the same for a seed whatever the fault settings' code. :func:`simulate`
returns the truth beside the IQ; :mod:`heimdall_inference.core.codec` turns a scene into a
``heimdall.iq/v1`` payload.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..core.network import Network
from ..core.types import IQ, FloatArray

__all__ = ["Priors", "WORLDS", "BANDS", "SignalConfig", "Scenes", "draw_scenes", "render_iq", "agc_gain_db", "simulate", "scene_payloads",
           "fspl_db", "noise_power_dbm", "SPEED_OF_LIGHT_M_S"]

SPEED_OF_LIGHT_M_S = 299_792_458.0


BANDS: dict[str, tuple[float, float]] = {"2m": (144.0e6, 146.0e6), "70cm": (430.0e6, 440.0e6)}
"""The network's bands: centre frequencies (Hz) of each, by name."""


@dataclass(frozen=True, kw_only=True)
class Priors:
    """The simulator's priors; the grid posterior of :mod:`evaluation` marginalises the same ones."""

    margin_m: float = 30_000.0  #: transmitter region: receivers' bounding box grown by this much
    #: and also every point within this distance of the receivers' convex hull (0: the box alone)
    hull_margin_m: float = 0.0
    tx_power_dbm: tuple[float, float] = (30.0, 50.0)  #: uniform EIRP range
    path_loss_exponent: tuple[float, float] = (2.2, 3.8)  #: uniform per scene
    shadowing_db: tuple[float, float] = (4.0, 8.0)  #: uniform per scene: std of per-receiver shadowing
    gain_error_db: float = 1.0  #: std of the per-receiver calibration error
    reference_distance_m: float = 1000.0  #: d0 of the log-distance model
    noise_figure_db: float = 8.0  #: receiver noise figure
    center_freq_hz: tuple[float, float] = (144.0e6, 146.0e6)  #: uniform carrier frequency
    min_receivers: int = 3  #: fewest receivers online
    miscalibrated_share: float = 0.0  #: share of scenes with one online receiver badly miscalibrated
    miscalibration_db: float = 10.0  #: std of that receiver's further gain error
    deaf_share: float = 0.0  #: share of scenes (disjoint from the above) with one online receiver hearing only noise
    band: str = "2m"  #: the band's name (:data:`BANDS`)
    world: str = "nominal"  #: the world's name (:data:`WORLDS`), for reports

    @classmethod
    def nominal(cls, band: str = "2m") -> "Priors":
        """The world a band's model is trained on first: the physics of the module docstring."""
        if band == "2m":
            return cls()
        if band == "70cm":
            return cls(band="70cm", center_freq_hz=BANDS["70cm"], path_loss_exponent=(2.4, 4.0),
                       shadowing_db=(5.0, 9.0), noise_figure_db=6.0)
        raise ValueError(f"unknown band {band!r}; the network's bands are {sorted(BANDS)}")

    @classmethod
    def wide(cls, band: str = "2m") -> "Priors":
        """A harder world than the nominal one (honest uncertainty off the training distribution): transmitters also
        anywhere up to 60 km outside the receivers' convex hull (the nominal box stays in it: a superset), exponents
        0.4 wider on each side, shadowing spreads 1 dB lower and 2 dB higher, calibration errors of 1.5 dB standard
        deviation (about +-3 dB at two sigma), weaker and stronger transmitters (20-55 dBm: 100 mW handhelds to
        300 W), one receiver badly miscalibrated (10 dB rms) in 10 % of scenes and one hearing only noise in 5 %."""
        base = cls.nominal(band)
        n0, n1 = base.path_loss_exponent
        s0, s1 = base.shadowing_db
        return replace(base, world="wide", hull_margin_m=60_000.0, tx_power_dbm=(20.0, 55.0),
                       path_loss_exponent=(round(n0 - 0.4, 6), round(n1 + 0.4, 6)),
                       shadowing_db=(s0 - 1.0, s1 + 2.0), gain_error_db=1.5,
                       miscalibrated_share=0.10, deaf_share=0.05)

    @classmethod
    def preset(cls, world: str = "nominal", band: str = "2m") -> "Priors":
        """The priors of a world (:data:`WORLDS`) in a band (:data:`BANDS`)."""
        if world not in WORLDS:
            raise ValueError(f"unknown world {world!r}; the worlds are {sorted(WORLDS)}")
        return WORLDS[world](band)

    @property
    def faults(self) -> bool:
        """Does this world have faulty receivers?"""
        return self.miscalibrated_share > 0 or self.deaf_share > 0

    def to_dict(self) -> dict:
        """JSON-ready (the model card and the training cache key)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def region(self, network: Network) -> tuple[float, float, float, float]:
        """(east_min, east_max, north_min, north_max) metres: the rectangle that holds the transmitter prior (the box
        grown by ``margin_m``, and the hull's ``hull_margin_m`` neighbourhood if it reaches further)."""
        rx = network.receiver_enu()
        m = max(self.margin_m, self.hull_margin_m)
        return (rx[:, 0].min() - m, rx[:, 0].max() + m, rx[:, 1].min() - m, rx[:, 1].max() + m)

    def contains(self, network: Network, east_m: FloatArray, north_m: FloatArray) -> np.ndarray:
        """Which points lie in the transmitter prior: the receivers' box grown by ``margin_m``, or within
        ``hull_margin_m`` of their convex hull."""
        from ..core.quality import hull_distances_m

        rx = network.receiver_enu()
        e, n = np.asarray(east_m, float), np.asarray(north_m, float)
        m = self.margin_m
        inside = ((e >= rx[:, 0].min() - m) & (e <= rx[:, 0].max() + m) &
                  (n >= rx[:, 1].min() - m) & (n <= rx[:, 1].max() + m))
        if self.hull_margin_m > 0 and not inside.all():
            out = ~inside
            inside[out] = hull_distances_m(rx, np.stack([e[out], n[out]], axis=1)) <= self.hull_margin_m
        return inside


WORLDS = {"nominal": Priors.nominal, "wide": Priors.wide}
"""``evaluate --world``: the priors of each world, by name (each takes the band)."""


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
    rx_power_dbm: FloatArray  #: [S, R] received signal power, incl. shadowing and gain error (-inf: hears only noise)
    noise_power_dbm: float  #: thermal noise over the sampled band
    miscalibrated: np.ndarray | None = None  #: [S] the slot of the badly miscalibrated receiver, -1 for none
    deaf: np.ndarray | None = None  #: [S] the slot of the receiver hearing only noise, -1 for none
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
            "rx_power_dbm": {ids[r]: (float(self.rx_power_dbm[i, r]) if np.isfinite(self.rx_power_dbm[i, r]) else None)
                             for r in np.flatnonzero(self.online[i])},
            "noise_power_dbm": float(self.noise_power_dbm),
            "miscalibrated": self._slot_id(self.miscalibrated, i, ids),
            "deaf": self._slot_id(self.deaf, i, ids),
        }

    @staticmethod
    def _slot_id(slots: np.ndarray | None, i: int, ids: tuple[str, ...]) -> str | None:
        return ids[int(slots[i])] if slots is not None and slots[i] >= 0 else None


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
    out = ~priors.contains(network, east, north)  # uniform over the region: redraw what fell outside it
    while out.any():  # (the box alone never redraws: a nominal world's random stream is the same as ever)
        east[out] = rng.uniform(e0, e1, int(out.sum()))
        north[out] = rng.uniform(n0, n1, int(out.sum()))
        out[out] = ~priors.contains(network, east[out], north[out])
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
    rx_power = mean_db + shadow + gain_err
    miscalibrated = deaf = None
    if priors.faults:  # drawn only where the world has faults: a nominal world's scenes do not depend on them
        u = rng.random(count)
        # the faulty receiver: uniform among the online ones (order[:, :k] are the online slots)
        which = order[np.arange(count), np.minimum((rng.random(count) * k).astype(int), k - 1)]
        offset = rng.standard_normal(count) * priors.miscalibration_db
        bad = u < priors.miscalibrated_share
        dead = (u >= priors.miscalibrated_share) & (u < priors.miscalibrated_share + priors.deaf_share)
        miscalibrated = np.where(bad, which, -1)
        deaf = np.where(dead, which, -1)
        rows = np.arange(count)
        rx_power[rows[bad], which[bad]] += offset[bad]
        rx_power[rows[dead], which[dead]] = -np.inf
    return Scenes(east_m=east, north_m=north, lat=lat, lon=lon, tx_power_dbm=ptx, path_loss_exponent=expo,
                  shadowing_db=sigma, center_freq_hz=freq, online=online, rx_power_dbm=rx_power,
                  noise_power_dbm=noise_power_dbm(signal.sample_rate_hz, priors.noise_figure_db),
                  miscalibrated=miscalibrated, deaf=deaf)


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
