"""A simple map picture: receivers, the fix, its 68 % / 95 % ellipses and (optionally) the truth.

Plain lon/lat axes with the aspect of the local latitude (no tiles: nothing is downloaded).
Needs the ``plot`` extra (matplotlib), imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.network import Network
from ..core.fix import ellipse_radius
from ..core.uncertainty import ellipse_polygon_enu, ellipse_scale

__all__ = ["plot_fixes"]


def plot_fixes(network: Network, fixes: Sequence[dict[str, Any]], path: str | Path, *,
               truths: Sequence[dict[str, Any] | None] | None = None, title: str | None = None) -> Path:
    """Draw the fixes (``heimdall.fix/v1`` dicts) over the network and write a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    lats = [r.lat for r in network.receivers]
    lons = [r.lon for r in network.receivers]
    ax.scatter(lons, lats, marker="^", s=70, c="black", zorder=5, label="receivers")
    sites: dict[tuple[float, float], list[str]] = {}
    for r in network.receivers:  # co-located receivers (giaveno, coazze) share one label
        sites.setdefault((r.lon, r.lat), []).append(r.id)
    for (lon, lat), ids in sites.items():
        ax.annotate(" / ".join(ids), (lon, lat), textcoords="offset points", xytext=(4, 4), fontsize=8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    truths = list(truths) if truths is not None else [None] * len(fixes)
    for i, fix in enumerate(fixes):
        c = colors[i % len(colors)]
        pos = fix["position"]
        center = np.array([pos["east_m"], pos["north_m"]])
        cov = np.array(fix["uncertainty"]["covariance_enu_m2"])
        for p, style in ((0.68, "-"), (0.95, "--")):
            ring = ellipse_polygon_enu(center, cov / ellipse_scale(p) ** 2 * ellipse_radius(fix, p) ** 2, p)
            la, lo = network.to_geodetic(ring[:, 0], ring[:, 1])
            ax.plot(lo, la, style, color=c, lw=1.2, label=f"{int(p * 100)} % ellipse" if i == 0 else None)
        ax.plot(pos["lon"], pos["lat"], "o", color=c, ms=7, label="fix" if i == 0 else None)
        truth = truths[i] if i < len(truths) else None
        if truth is not None:
            ax.plot(truth["lon"], truth["lat"], "x", color=c, ms=9, mew=2, label="truth" if i == 0 else None)
            ax.plot([truth["lon"], pos["lon"]], [truth["lat"], pos["lat"]], ":", color=c, lw=1)
    ax.set_aspect(1.0 / np.cos(np.radians(network.origin_lat)))
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or f"heimdall fixes ({len(fixes)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
