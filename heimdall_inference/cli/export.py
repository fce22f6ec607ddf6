"""``heimdall-inference export --geojson FILE``: recent fixes from the database as a GeoJSON FeatureCollection.

One Point per fix (its properties: key, capture time, model version and alias, receivers, the 95 % ellipse's
axes and orientation, cached) and, unless ``--no-ellipses``, one Polygon per fix: its 95 % ellipse as a
closed counter-clockwise ring (RFC 7946), computed from the stored covariance in a tangent plane at the fix
itself. QGIS opens the file as two layers (points and polygons); a Grafana geomap panel takes it as a
GeoJSON layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..store.base import since_timestamp

__all__ = ["fixes_geojson", "export_geojson"]


def fixes_geojson(rows: Sequence[dict[str, Any]], *, ellipses: bool = True, points: int = 72) -> dict[str, Any]:
    """Rows of :meth:`~heimdall_inference.store.base.Store.recent_fixes` -> a FeatureCollection."""
    import pymap3d

    from ..core.uncertainty import ellipse_rings_enu, ellipse_scale, geojson_polygons

    features: list[dict[str, Any]] = []
    for r in rows:
        props = {"kind": "fix", "fix_key": r["fix_key"], "captured_at": r["captured_at"],
                 "model_name": r["model_name"], "model_version": r["model_version"], "model_alias": r["model_alias"],
                 "receivers": list(r["receivers"] or []), "cached": bool(r["cached"]), "quality": r["quality_grade"],
                 "semi_major_95_m": r["semi_major_95_m"], "semi_minor_95_m": r["semi_minor_95_m"],
                 "orientation_95_deg": r["orientation_95_deg"]}
        features.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [r["lon"], r["lat"]]},
                         "properties": props})
    if ellipses and rows:
        cov = np.array([[[r["cov_ee_m2"], r["cov_en_m2"]], [r["cov_en_m2"], r["cov_nn_m2"]]] for r in rows], float)
        # the stored 95 % ellipse's own radius (a Student-t model's is wider than the Gaussian's): scale to it
        lam_max = np.linalg.eigvalsh(cov)[:, -1]
        radius = np.array([r["semi_major_95_m"] for r in rows], float) / np.sqrt(lam_max)
        scaled = cov * (radius / float(ellipse_scale(0.95)))[:, None, None] ** 2
        rings = ellipse_rings_enu(np.zeros((len(rows), 2)), scaled, 0.95, points)
        lat0 = np.array([r["lat"] for r in rows], float)[:, None]
        lon0 = np.array([r["lon"] for r in rows], float)[:, None]
        lat, lon, _ = pymap3d.enu2geodetic(rings[..., 0], rings[..., 1], 0.0, lat0, lon0, 0.0)
        for r, poly in zip(rows, geojson_polygons(np.asarray(lon), np.asarray(lat), 0.95)):
            poly["properties"] = {"kind": "ellipse_95", "fix_key": r["fix_key"], "captured_at": r["captured_at"],
                                  "model_version": r["model_version"], "confidence": 0.95}
            features.append(poly)
    return {"type": "FeatureCollection", "features": features}


def export_geojson(store: Any, path: Path, *, since_hours: float | None = 24.0, limit: int = 10_000,
                   ellipses: bool = True) -> dict[str, Any]:
    """Write the fixes captured in the last ``since_hours`` (None: all), newest first, at most ``limit``."""
    since = since_timestamp(since_hours)
    rows = store.recent_fixes(since, limit=limit)
    doc = fixes_geojson(rows, ellipses=ellipses)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return {"path": str(path), "fixes": len(rows), "features": len(doc["features"]), "since": since}
