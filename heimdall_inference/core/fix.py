"""The ``heimdall.fix/v1`` result document (contract: docs/architecture.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .payload import DecodedPayload
from .spec import ModelSpec
from .quality import fix_quality, thresholds
from .uncertainty import DEFAULT_CONFIDENCES, ellipse_axes, ellipse_rings_enu, geojson_polygons

__all__ = ["SCHEMA_FIX", "build_fixes", "ellipse_radius", "covers"]

SCHEMA_FIX = "heimdall.fix/v1"


def build_fixes(decoded: list[DecodedPayload], mean_enu: np.ndarray, cov: np.ndarray, spec: ModelSpec, *,
                timings_ms: dict[str, float], task_ids: list[str | None] | None = None,
                alias: str | None = None, name: str | None = None, version: str | None = None,
                geojson: bool = True) -> list[dict[str, Any]]:
    """One fix document per payload; ``mean_enu`` [B, 2] metres, ``cov`` [B, 2, 2] m^2 (vectorised).
    ``name``/``version`` (a registered model's) replace the ones in the model's own metadata. ``geojson=False``
    leaves out ``uncertainty.geojson``, the 95 % ellipse's ring, derived from the covariance: for documents that
    only go to the database, which stores them without it (a chord chunk's; ~10 % of a chunk's time)."""
    if not decoded:
        return []
    b = len(decoded)
    major, minor, bearing = ellipse_axes(cov, DEFAULT_CONFIDENCES, spec.dof)
    if geojson:
        rings = ellipse_rings_enu(mean_enu, cov, DEFAULT_CONFIDENCES[-1], dof=spec.dof)  # [B, N + 1, 2]
        # one geodetic conversion for the positions and every ring vertex (it dominates small batches)
        lat_all, lon_all = spec.network.to_geodetic(np.concatenate([mean_enu[:, 0], rings[..., 0].ravel()]),
                                                    np.concatenate([mean_enu[:, 1], rings[..., 1].ravel()]))
        lat, lon = lat_all[:b], lon_all[:b]
        shapes = geojson_polygons(lon_all[b:].reshape(rings.shape[:2]), lat_all[b:].reshape(rings.shape[:2]),
                                  DEFAULT_CONFIDENCES[-1])
    else:
        lat, lon = spec.network.to_geodetic(mean_enu[:, 0], mean_enu[:, 1])
    task_ids = task_ids or [None] * len(decoded)
    model = {"name": name or spec.name, "version": version or spec.version, "alias": alias}
    powers = [d.mean_power for d in decoded]
    quality = fix_quality(spec.network, [d.receiver_ids for d in decoded], [d.iq for d in decoded],
                          spec.features.full_scale_dbm, mean_enu, **thresholds(spec.quality),
                          powers=None if any(p is None for p in powers) else powers)
    # every number of the batch leaves numpy in one conversion per field, rounded as Ellipse.to_dict rounds
    lat_r = [round(x, 6) for x in lat.tolist()]
    lon_r = [round(x, 6) for x in lon.tolist()]
    east_r = [round(x, 1) for x in mean_enu[:, 0].tolist()]
    north_r = [round(x, 1) for x in mean_enu[:, 1].tolist()]
    covs = cov.tolist()
    majors, minors, bearings = major.tolist(), minor.tolist(), bearing.tolist()
    out = []
    for i, d in enumerate(decoded):
        (c00, c01), (c10, c11) = covs[i]
        b = round(bearings[i], 2)
        uncertainty = {
            "covariance_enu_m2": [[c00, c01], [c10, c11]],
            "ellipses": [{"confidence": p, "semi_major_m": round(majors[i][j], 1),
                          "semi_minor_m": round(minors[i][j], 1), "orientation_deg": b}
                         for j, p in enumerate(DEFAULT_CONFIDENCES)],
        }
        if geojson:
            uncertainty["geojson"] = shapes[i]
        out.append({
            "schema": SCHEMA_FIX,
            "task_id": task_ids[i],
            "request_id": d.request_id,
            "captured_at": d.captured_at,
            "position": {"lat": lat_r[i], "lon": lon_r[i], "east_m": east_r[i], "north_m": north_r[i]},
            "uncertainty": uncertainty,
            "receivers_used": list(d.receiver_ids),
            "quality": quality[i],
            "model": dict(model),
            "cached": False,
            "timings_ms": dict(timings_ms),
        })
    return out


def ellipse_radius(fix: dict[str, Any], confidence: float) -> float:
    """The Mahalanobis radius a fix used for its ``confidence`` ellipse (whatever its model's family)."""
    cov = np.asarray(fix["uncertainty"]["covariance_enu_m2"], float)
    e = next(e for e in fix["uncertainty"]["ellipses"] if abs(e["confidence"] - confidence) < 1e-9)
    return float(e["semi_major_m"] / np.sqrt(np.linalg.eigvalsh(cov)[-1]))


def covers(fix: dict[str, Any], east_m: float, north_m: float, confidence: float = 0.95) -> bool:
    """Does the fix's ``confidence`` ellipse contain the point (tangent-plane metres)?"""
    cov = np.asarray(fix["uncertainty"]["covariance_enu_m2"], float)
    d = np.array([east_m - fix["position"]["east_m"], north_m - fix["position"]["north_m"]])
    return bool(d @ np.linalg.solve(cov, d) <= ellipse_radius(fix, confidence) ** 2 * (1 + 1e-6))
