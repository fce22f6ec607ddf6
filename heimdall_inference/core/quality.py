"""A quality flag on every fix: where it lies against the receivers, how well their powers fit, and a grade.

``quality`` is an additive field of ``heimdall.fix/v1`` (docs/architecture.md):

* ``outside_hull_m``: how far the fix lies outside the convex hull of the receivers that heard it (0
  inside; None when they span no area, e.g. three receivers two of which share a site). Power-only fixes
  outside the network stretch along the bearing away from it, and the further out, the closer to the
  edge of what the model was trained on.
* ``residual_db``: how well the received powers fit the log-distance law seen from the fix. Each
  receiver's band power ``P_i`` (dBm: ``10 log10 mean|x|^2`` plus the model's full-scale power) is fitted as
  ``P_i = a - 10 n log10(d_i / 1 km)`` by least squares over the transmit level ``a`` and the exponent
  ``n`` (clipped to [1.5, 5]); ``residual_db`` is the RMS residual with ``r - 2`` degrees of freedom (None
  with fewer than 3 receivers at distinct distances). Shadowing of 4-8 dB makes 3-8 dB typical; a
  receiver that is badly miscalibrated, or hears something else, pushes it up.
* ``grade`` (``good`` / ``fair`` / ``poor``) and ``reasons``: ``poor`` when the residual exceeds the poor
  threshold; ``fair`` when it exceeds the fair threshold, when the fix lies more than :data:`FAIR_OUTSIDE_M`
  outside the hull, or when the receivers span no area; ``good`` otherwise. The thresholds are the 95th and
  99.5th percentiles of the residual on the model's nominal world, measured by the training script and kept
  in the model's metadata (``quality``: shadowing differs between bands); :data:`FAIR_RESIDUAL_DB` and
  :data:`POOR_RESIDUAL_DB` stand in for a model without them. Measured over 2,000 simulated scenes of the 2 m
  nominal world (seeds 1000-1003): the residual's 95th percentile is 9.4 dB and its 99.5th 13.1 dB, and 20 %
  of fixes lie more than 25 km outside the hull of their receivers. A receiver reading 20 dB too high among five or more
  raises the residual above the fair threshold in about 41 % of scenes, against 4 % of the same scenes
  without it: the fix moves toward the outlier and hides part of its error (a leave-one-out statistic did
  worse, 6 %). The ellipse's size is not graded: it is in the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .network import Network

__all__ = ["fix_quality", "mean_power", "power_residual_db", "hull_distance_m", "hull_distances_m", "thresholds", "FAIR_RESIDUAL_DB", "POOR_RESIDUAL_DB",
           "FAIR_OUTSIDE_M", "GRADES"]

FAIR_RESIDUAL_DB = 9.5  #: about the nominal world's 95th percentile of residual_db (9.4 dB over 2,000 scenes)
POOR_RESIDUAL_DB = 13.0  #: about its 99.5th percentile (13.1 dB)
FAIR_OUTSIDE_M = 25_000.0  #: a fix further than this outside its receivers' hull is at best fair
GRADES = ("good", "fair", "poor")
_EXPONENT = (1.5, 5.0)


def hull_distance_m(points: np.ndarray, p: np.ndarray) -> float | None:
    """How far ``p`` (2,) lies outside the convex hull of ``points`` [k, 2], metres (0 inside or on it; None when the
    points span no area: fewer than three distinct sites, or all on a line)."""
    edges = _hull_edges(points)
    return None if edges is None else _outside(edges, np.asarray(p, float))


def _hull_edges(points: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The hull's edges (start [h, 2], end [h, 2]) counter-clockwise, by Andrew's monotone chain; None if degenerate."""
    pts = np.unique(np.round(np.asarray(points, float), 3), axis=0)
    if len(pts) < 3:
        return None
    order = pts[np.lexsort((pts[:, 1], pts[:, 0]))]

    def half(seq: np.ndarray) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for q in seq:
            while len(out) >= 2 and _cross(out[-2], out[-1], q) <= 0:
                out.pop()
            out.append(q)
        return out

    hull = np.array(half(order)[:-1] + half(order[::-1])[:-1])
    if len(hull) < 3:
        return None
    return hull, np.roll(hull, -1, axis=0)


def hull_distances_m(points: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Vectorised :func:`hull_distance_m`: how far each of ``p`` [n, 2] lies outside the hull of ``points`` [k, 2]
    (0 inside; NaN everywhere when the points span no area)."""
    edges = _hull_edges(points)
    p = np.asarray(p, float).reshape(-1, 2)
    if edges is None:
        return np.full(len(p), np.nan)
    a, b = edges
    ab = b - a  # [h, 2]
    ap = p[:, None, :] - a[None, :, :]  # [n, h, 2]
    inside = np.all(ab[None, :, 0] * ap[..., 1] - ab[None, :, 1] * ap[..., 0] >= -1e-6, axis=1)
    t = np.clip(np.einsum("nhj,hj->nh", ap, ab) / np.einsum("hj,hj->h", ab, ab), 0.0, 1.0)
    d = np.hypot(ap[..., 0] - t * ab[None, :, 0], ap[..., 1] - t * ab[None, :, 1]).min(axis=1)
    return np.where(inside, 0.0, d)


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def _outside(edges: tuple[np.ndarray, np.ndarray], p: np.ndarray) -> float:
    a, b = edges
    ab, ap = b - a, p - a
    if np.all(ab[:, 0] * ap[:, 1] - ab[:, 1] * ap[:, 0] >= -1e-6):
        return 0.0
    t = np.clip(np.einsum("ij,ij->i", ap, ab) / np.einsum("ij,ij->i", ab, ab), 0.0, 1.0)
    return float(np.min(np.hypot(*(ap - t[:, None] * ab).T)))


_HULLS: dict[int, tuple[Network, dict[frozenset[str], tuple[np.ndarray, np.ndarray, bool]]]] = {}


def _receivers_hull(network: Network, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """The hull of a set of the network's receivers (a network of R receivers has at most 2^R such sets), as its
    edges' starts and ends padded to R edges ([R, 2] each; see :func:`_outside_many`) and whether it spans an area.
    Kept per network object: hashing the network itself for every fix cost more than the hull."""
    held = _HULLS.get(id(network))
    if held is None or held[0] is not network:
        held = _HULLS[id(network)] = (network, {})
    hulls = held[1]
    key = frozenset(ids)
    if key not in hulls:
        rx = network.receiver_enu()
        edges = _hull_edges(rx[[network.index[r] for r in ids]])
        a, e = np.zeros((len(network), 2)), np.zeros((len(network), 2))
        if edges is not None:
            k = len(edges[0])
            a[:k], e[:k] = edges
            a[k:] = e[k:] = edges[0][0]
        hulls[key] = (a, e, edges is not None)
    return hulls[key]


def _outside_many(hulls: Sequence[tuple[np.ndarray, np.ndarray, bool]], p: np.ndarray) -> np.ndarray:
    """:func:`_outside` for many (hull, point) pairs at once: [B] metres, NaN where the hull is degenerate. The
    hulls' edges are padded to a common count with edges of zero length at their first vertex (a point's distance to
    a vertex of the hull is never smaller than its distance to the hull, and the inside test holds on them)."""
    a = np.stack([h[0] for h in hulls])  # [B, H, 2]
    e = np.stack([h[1] for h in hulls])
    ok = np.array([h[2] for h in hulls])
    ab = e - a
    ap = p[:, None, :] - a
    inside = np.all(ab[..., 0] * ap[..., 1] - ab[..., 1] * ap[..., 0] >= -1e-6, axis=1)
    length2 = np.einsum("bhj,bhj->bh", ab, ab)
    t = np.clip(np.einsum("bhj,bhj->bh", ap, ab) / np.where(length2 > 0, length2, 1.0), 0.0, 1.0)
    d = np.hypot(ap[..., 0] - t * ab[..., 0], ap[..., 1] - t * ab[..., 1]).min(axis=1)
    return np.where(ok, np.where(inside, 0.0, d), np.nan)


def power_residual_db(rx_enu: np.ndarray, power_dbm: np.ndarray, p: np.ndarray) -> float | None:
    """RMS residual (dB, ``r - 2`` degrees of freedom) of the powers against the log-distance law from ``p``."""
    out = _residuals(np.asarray(rx_enu, float)[None], np.asarray(power_dbm, float)[None],
                     np.ones((1, len(power_dbm)), bool), np.asarray(p, float)[None])[0]
    return None if np.isnan(out) else float(out)


def _residuals(rx: np.ndarray, power: np.ndarray, used: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Vectorised :func:`power_residual_db`: receivers [B, R, 2], powers [B, R] dBm, which are used [B, R], fixes
    [B, 2] -> [B] (NaN where it is not defined)."""
    m = used.astype(float)
    k = m.sum(axis=1)
    x = 10.0 * np.log10(np.maximum(np.hypot(rx[..., 0] - p[:, None, 0], rx[..., 1] - p[:, None, 1]), 1000.0) / 1000.0)
    y = np.where(used, power, 0.0)
    kk = np.maximum(k, 1.0)
    xm, ym = (x * m).sum(axis=1) / kk, (y * m).sum(axis=1) / kk
    dx, dy = (x - xm[:, None]) * m, (y - ym[:, None]) * m
    sxx = (dx * dx).sum(axis=1)
    ok = (k >= 3) & (sxx > 1e-9)
    n = np.clip(-(dx * dy).sum(axis=1) / np.where(ok, sxx, 1.0), *_EXPONENT)
    a = ((y + n[:, None] * x) * m).sum(axis=1) / kk
    res2 = (((y - (a[:, None] - n[:, None] * x)) * m) ** 2).sum(axis=1)
    return np.where(ok, np.sqrt(res2 / np.maximum(k - 2, 1.0)), np.nan)


def thresholds(quality: dict[str, float]) -> dict[str, float]:
    """The residual thresholds a model's metadata gives (``spec.quality``), else the 2 m defaults."""
    return {"fair_residual_db": float(quality.get("fair_residual_db", FAIR_RESIDUAL_DB)),
            "poor_residual_db": float(quality.get("poor_residual_db", POOR_RESIDUAL_DB))}


def mean_power(iq: np.ndarray) -> np.ndarray:
    """[r, n] complex64 IQ -> [r] mean |x|^2 per receiver (full-scale units), as the quality flag reads it."""
    flat = np.asarray(iq, np.complex64).view(np.float32)  # [r, 2n] I, Q interleaved
    return np.einsum("ij,ij->i", flat, flat) / (flat.shape[1] // 2)


def fix_quality(network: Network, receiver_ids: Sequence[Sequence[str]], iq: Sequence[np.ndarray],
                full_scale_dbm: float, mean_enu: np.ndarray, *, fair_residual_db: float = FAIR_RESIDUAL_DB,
                poor_residual_db: float = POOR_RESIDUAL_DB,
                powers: Sequence[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """The ``quality`` field of each fix: ``receiver_ids[b]`` heard it with IQ ``iq[b]`` [r, n] complex64
    (full-scale units); its position is ``mean_enu[b]`` (metres). The residual thresholds are the model's.
    ``powers``: each payload's :func:`mean_power`, when its decoder measured it already (on samples still in cache)."""
    b, r = len(receiver_ids), len(network)
    if b == 0:
        return []
    slot = network.index
    rows = [slot[rid] for ids in receiver_ids for rid in ids]
    owner = np.repeat(np.arange(b), [len(ids) for ids in receiver_ids])
    mean_sq = np.concatenate(powers) if powers is not None else mean_power(np.concatenate(iq))
    power = np.zeros((b, r))
    used = np.zeros((b, r), bool)
    power[owner, rows] = 10.0 * np.log10(np.maximum(mean_sq, 1e-30)) + full_scale_dbm
    used[owner, rows] = True
    p = np.asarray(mean_enu, float)
    residual = _residuals(np.broadcast_to(network.receiver_enu(), (b, r, 2)), power, used, p)
    outside_m = _outside_many([_receivers_hull(network, ids) for ids in receiver_ids], p)
    out = []
    for outside, res in zip(outside_m.tolist(), residual.tolist()):
        outside = None if outside != outside else outside  # NaN: the receivers span no area
        res = None if res != res else res
        reasons = []
        if outside is None:
            reasons.append("the receivers span no area")
        elif outside > FAIR_OUTSIDE_M:
            reasons.append(f"{outside / 1e3:.0f} km outside the receivers' hull")
        if res is not None and res > fair_residual_db:
            reasons.append(f"the receivers disagree with the path-loss law ({res:.1f} dB rms)")
        grade = "poor" if res is not None and res > poor_residual_db else "fair" if reasons else "good"
        out.append({"grade": grade, "outside_hull_m": None if outside is None else round(outside, 1),
                    "residual_db": None if res is None else round(res, 2), "reasons": reasons})
    return out
