"""``heimdall-inference model compare``: what an operator reads before promoting a challenger.

From the stored rows (``predictions`` and ``shadow_fixes``, any store):

* **arms**: the fixes each model version and alias served in the window, and their share (an A/B split
  of 90/10 should read about 0.9/0.1; sessions, not fixes, are the unit drawn, so small windows wander);
* **shadow**: per (served version, shadow version), how far the shadow model's fix lies from the served
  one (median and 95th percentile, metres) and how often each lies inside the other's 95 % ellipse. Two
  models that agree put each other inside nearly always; a shadow far outside the served ellipses is a
  model that would send operators elsewhere. Without ground truth this is agreement, not accuracy: the
  model card's figures say which is closer to the truth on simulated scenes.

Positions are compared in the network's tangent plane (east/north metres): every model a worker serves
side by side takes the same receivers, hence the same origin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..store import Store
from ..store.base import since_timestamp

__all__ = ["compare_shadow", "arm_shares", "experiment_report"]


def _inside_95(de: np.ndarray, dn: np.ndarray, cee: np.ndarray, cen: np.ndarray, cnn: np.ndarray,
               semi_major_95: np.ndarray) -> np.ndarray:
    """Is the offset (de, dn) inside each fix's 95 % ellipse? The ellipse's Mahalanobis radius is its semi-major
    axis over the covariance's largest standard deviation (whatever the model's predictive family)."""
    det = cee * cnn - cen ** 2
    m2 = (cnn * de ** 2 - 2 * cen * de * dn + cee * dn ** 2) / det
    lam_max = 0.5 * (cee + cnn) + np.sqrt(0.25 * (cee - cnn) ** 2 + cen ** 2)
    return m2 <= (semi_major_95 ** 2 / lam_max) * (1 + 1e-9)


def compare_shadow(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Agreement between served and shadow fixes (:data:`~heimdall_inference.store.base.PAIR_COLUMNS` rows),
    one entry per (served version, shadow version)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in pairs:
        groups.setdefault((str(p["served_model_version"]), str(p["shadow_model_version"])), []).append(p)
    out = []
    for (served, shadow), rows in sorted(groups.items()):
        col = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k.endswith(("_m", "_m2"))}
        de = col["shadow_east_m"] - col["served_east_m"]
        dn = col["shadow_north_m"] - col["served_north_m"]
        dist = np.hypot(de, dn)
        in_served = _inside_95(de, dn, col["served_cov_ee_m2"], col["served_cov_en_m2"], col["served_cov_nn_m2"],
                               col["served_semi_major_95_m"])
        in_shadow = _inside_95(-de, -dn, col["shadow_cov_ee_m2"], col["shadow_cov_en_m2"], col["shadow_cov_nn_m2"],
                               col["shadow_semi_major_95_m"])
        out.append({
            "served": {"version": served, "aliases": sorted({str(r["served_model_alias"]) for r in rows
                                                             if r["served_model_alias"]})},
            "shadow": {"version": shadow, "aliases": sorted({str(r["shadow_model_alias"]) for r in rows
                                                             if r["shadow_model_alias"]})},
            "fixes": len(rows),
            "distance_m": {"median": round(float(np.median(dist)), 1),
                           "p95": round(float(np.percentile(dist, 95)), 1)},
            "shadow_inside_served_95": round(float(in_served.mean()), 4),
            "served_inside_shadow_95": round(float(in_shadow.mean()), 4),
            "median_semi_major_95_m": {"served": round(float(np.median(col["served_semi_major_95_m"])), 1),
                                       "shadow": round(float(np.median(col["shadow_semi_major_95_m"])), 1)},
        })
    return out


def arm_shares(counts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fixes per (model version, alias) and their share of all fixes in the window."""
    total = sum(int(c["fixes"]) for c in counts)
    return [{"model_version": c["model_version"], "alias": c["model_alias"], "fixes": int(c["fixes"]),
             "share": round(int(c["fixes"]) / total, 4) if total else 0.0} for c in counts]


def experiment_report(store: Store, *, since_hours: float | None = 24.0, limit: int = 1_000_000) -> dict[str, Any]:
    """The arms and the shadow agreement over fixes captured in the last ``since_hours`` (None: all)."""
    since = since_timestamp(since_hours)
    return {"since": since, "arms": arm_shares(store.arm_counts(since)),
            "shadow": compare_shadow(store.shadow_pairs(since, limit=limit))}
