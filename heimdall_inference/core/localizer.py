"""The in-process pipeline: decode -> features -> ONNX -> covariance -> ellipses -> fix.

One :class:`Localizer` per process holds the warm session, the payload decoder and the feature plan.
:meth:`Localizer.predict_many` runs any number of payloads through one vectorised feature pass and
one ``session.run``; invalid payloads come back as :class:`PayloadError` in their slot.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InferenceError, PayloadError
from .features import FeaturePlan
from .payload import DecodedPayload, IqRefFetcher, Limits, PayloadDecoder
from .fix import build_fixes
from .session import ModelSession, SessionOptions
from .uncertainty import covariance_from_params

__all__ = ["Localizer", "Estimates", "FeatureBatch"]

RawPayload = bytes | bytearray | memoryview | dict[str, Any]


@dataclass(frozen=True)
class FeatureBatch:
    """A batch's model inputs: features [B, R, mels, frames], receiver mask [B, R], and what they took (ms)."""

    feats: np.ndarray
    mask: np.ndarray
    ms: float

    def take(self, rows: Sequence[int]) -> "FeatureBatch":
        """These rows (their share of the time)."""
        idx = np.asarray(rows, dtype=np.intp)
        return FeatureBatch(self.feats[idx], self.mask[idx], self.ms * len(idx) / max(1, len(self.feats)))


@dataclass
class Estimates:
    """Model outputs for a batch: mean [B, 2] metres east/north, covariance [B, 2, 2] m^2."""

    mean_enu: np.ndarray
    cov: np.ndarray
    features_ms: float
    inference_ms: float


class Localizer:
    """Warm model + decoder + feature plan; create one per process (after fork)."""

    def __init__(self, model_path: str | Path | None = None, *, session_options: SessionOptions | None = None,
                 limits: Limits | None = None, fetch_iq_ref: IqRefFetcher | None = None,
                 name: str | None = None, version: str | None = None) -> None:
        self.session = ModelSession(model_path, session_options)
        self.spec = self.session.spec
        self.name = name or self.spec.name  #: what fixes call the model (a registered model's name)
        self.version = version or self.spec.version  #: and its version (the registry's, for a registered one)
        self.decoder = PayloadDecoder(self.spec, limits, fetch_iq_ref)
        self.plan = FeaturePlan(self.spec.features)
        self._slot = self.spec.network.index

    def warm(self) -> None:
        """One session run on an empty batch-of-one (the first run allocates), so the first request served
        by a freshly loaded model is not the slow one."""
        r = len(self.spec.network)
        m, t = self.plan.shape
        mask = np.zeros((1, r), np.float32)
        mask[0, : self.spec.min_receivers] = 1.0
        self.session.run(np.zeros((1, r, m, t), np.float32), mask)

    def decode(self, raw: RawPayload, *, digest: bool = True) -> DecodedPayload:
        """Validate one payload; raises PayloadError. ``digest=False`` skips the cache key."""
        return self.decoder.decode(raw, digest=digest)

    def same_inputs(self, other: "Localizer") -> bool:
        """Do both models take the same payloads and features (receivers, signal, feature plan)? Then one
        decode and one feature pass serve both (A/B arms, a shadow model)."""
        return self.same_payloads(other) and self.spec.features == other.spec.features and \
            self.spec.bands_hz == other.spec.bands_hz

    def same_payloads(self, other: "Localizer") -> bool:
        """Can one decoder serve both, whatever their bands and feature plans (receivers, sample rate, snippet
        length, fewest receivers, resampling)? Then a worker decodes once and routes by band (a model per band)."""
        a, b = self.spec, other.spec
        return (a.network.to_dict(), a.sample_rate_hz, a.snippet_samples, a.features.full_scale_dbm, a.min_receivers,
                a.max_resample_ratio) == (b.network.to_dict(), b.sample_rate_hz, b.snippet_samples,
                                          b.features.full_scale_dbm, b.min_receivers, b.max_resample_ratio)

    def serves_frequency(self, center_freq_hz: float) -> bool:
        """Is this centre frequency inside one of the model's declared bands?"""
        return any(lo <= center_freq_hz <= hi for lo, hi in self.spec.bands_hz)

    def features(self, decoded: Sequence[DecodedPayload]) -> FeatureBatch:
        """Features [B, R, mels, frames] and the receiver mask [B, R] of a batch, in one pass."""
        t0 = time.perf_counter()
        b, r = len(decoded), len(self.spec.network)
        m, t = self.plan.shape
        mask = np.zeros((b, r), np.float32)
        rows, slots = [], []
        for i, d in enumerate(decoded):
            for rid in d.receiver_ids:
                rows.append(i)
                slots.append(self._slot[rid])
        iq = np.concatenate([d.iq for d in decoded]) if b else np.zeros((0, self.spec.snippet_samples), np.complex64)
        feats = np.zeros((b, r, m, t), np.float32)
        if len(rows):
            feats[rows, slots] = np.swapaxes(self.plan.frames_last(iq), -1, -2)  # one copy, into place
            mask[rows, slots] = 1.0
        return FeatureBatch(feats, mask, (time.perf_counter() - t0) * 1e3)

    def estimate(self, decoded: Sequence[DecodedPayload], features: FeatureBatch | None = None) -> Estimates:
        """Features for every present receiver in one pass (or ``features`` computed already by a model with
        the same inputs, :meth:`same_inputs`), then one session run."""
        f = features if features is not None else self.features(decoded)
        t1 = time.perf_counter()
        mean, params = self.session.run(f.feats, f.mask)
        t2 = time.perf_counter()
        return Estimates(mean_enu=mean.astype(np.float64), cov=covariance_from_params(params),
                         features_ms=f.ms, inference_ms=(t2 - t1) * 1e3)

    def fixes(self, decoded: Sequence[DecodedPayload], *, decode_ms: float = 0.0,
              task_ids: list[str | None] | None = None, alias: str | None = None,
              features: FeatureBatch | None = None, geojson: bool = True) -> list[dict[str, Any] | InferenceError]:
        """Estimate and build the ``heimdall.fix/v1`` documents; timings are per fix (batch / B).

        A payload whose position or covariance comes out non-finite gets an :class:`InferenceError`
        in its slot (a server fault, never a fix, never cached or stored); its neighbours are unaffected.
        ``features``: these payloads' features, computed already (:meth:`estimate`). ``geojson=False``: documents
        for the database only, without the ellipse's ring (:func:`~.fix.build_fixes`).
        """
        if not decoded:
            return []
        est = self.estimate(decoded, features)
        b = len(decoded)
        timings = {"decode": round(decode_ms / b, 3), "features": round(est.features_ms / b, 3),
                   "inference": round(est.inference_ms / b, 3)}
        ok = np.isfinite(est.mean_enu).all(axis=1) & np.isfinite(est.cov).all(axis=(1, 2))
        if ok.all():
            return list(build_fixes(list(decoded), est.mean_enu, est.cov, self.spec, timings_ms=timings,
                                    task_ids=task_ids, alias=alias, name=self.name, version=self.version,
                                    geojson=geojson))
        keep = np.flatnonzero(ok)
        out: list[dict[str, Any] | InferenceError] = [
            InferenceError(f"the model gave a non-finite position or covariance for receivers "
                           f"{list(decoded[i].receiver_ids)}") for i in range(b)]
        built = build_fixes([decoded[i] for i in keep], est.mean_enu[keep], est.cov[keep], self.spec, timings_ms=timings,
                            task_ids=[task_ids[i] for i in keep] if task_ids else None, alias=alias,
                            name=self.name, version=self.version, geojson=geojson)
        for i, fix in zip(keep, built):
            out[i] = fix
        return out

    def predict(self, raw: RawPayload, *, task_id: str | None = None) -> dict[str, Any]:
        """One payload -> one fix; raises PayloadError for invalid input, InferenceError for a non-finite output."""
        t0 = time.perf_counter()
        decoded = self.decode(raw)
        fix = self.fixes([decoded], decode_ms=(time.perf_counter() - t0) * 1e3, task_ids=[task_id])[0]
        if isinstance(fix, InferenceError):
            raise fix
        return fix

    def predict_many(self, raws: Sequence[RawPayload]) -> list[dict[str, Any] | PayloadError | InferenceError]:
        """Many payloads through one feature pass and one session run; errors stay in their slot."""
        t0 = time.perf_counter()
        results: list[dict[str, Any] | PayloadError | InferenceError] = []
        good: list[DecodedPayload] = []
        where: list[int] = []
        for i, raw in enumerate(raws):
            try:
                good.append(self.decode(raw))
                where.append(i)
                results.append(None)  # type: ignore[arg-type]
            except PayloadError as exc:
                results.append(exc)
        fixes = self.fixes(good, decode_ms=(time.perf_counter() - t0) * 1e3 * len(good) / max(1, len(raws)))
        for i, fix in zip(where, fixes):
            results[i] = fix
        return results
