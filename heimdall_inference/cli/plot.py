"""The map an operator looks at: receivers, fixes with their 68 % / 95 % ellipses, the truth when known, over
the coastline, the borders and the main cities.

Drawn in the network's tangent plane (east/north kilometres from its origin, equal scale on both axes): over
a few hundred kilometres that plane keeps areas and angles, so an ellipse looks as large and as tilted as it
is; a light graticule gives latitude and longitude. The basemap is shipped (``data/basemap.json``, a few
tens of KB): Natural Earth's 1:10m country outlines (public domain; arcs one country uses are coast, two a
border) and GeoNames' cities of 50,000 people or more (CC BY 4.0) around the network, so nothing is
downloaded. Labels are placed greedily (receivers first, then cities by population) at the first of eight
positions around their point that overlaps no label, marker or the legend; a city whose label finds no place
is drawn unlabelled. Needs the ``plot`` extra (matplotlib), imported lazily.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core.fix import ellipse_radius
from ..core.network import Network
from ..core.uncertainty import ellipse_polygon_enu, ellipse_scale

__all__ = ["plot_fixes", "load_basemap", "place_labels"]

_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11), (7, -3), (-7, -3), (0, 7), (0, -13))  #: points: NE, SE, NW, SW, E, W, N, S


def load_basemap() -> dict[str, Any]:
    """Coast and border polylines ([[lon, lat], ...]) and cities ({name, lat, lon, population}) around the network."""
    return json.loads(resources.files("heimdall_inference.data").joinpath("basemap.json").read_text())


def _overlaps(a: Any, b: Any) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def place_labels(ax: Any, items: Sequence[tuple[str, float, float, dict[str, Any]]], *,
                 avoid: Sequence[Any] = (), optional_from: int | None = None) -> list[Any]:
    """Put each ``(text, x, y, style)`` label at the first offset where its box overlaps nothing placed before
    (nor the boxes in ``avoid``, display coordinates) and stays inside the axes. Items from ``optional_from``
    on are dropped when no offset fits; the others take their first offset anyway. Returns the texts kept."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = list(avoid)
    kept = []
    for k, (text, x, y, style) in enumerate(items):
        optional = optional_from is not None and k >= optional_from
        chosen = None
        for dx, dy in _OFFSETS:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                            ha="left" if dx > 0 else "right" if dx < 0 else "center", **style)
            box = t.get_window_extent(renderer).expanded(1.05, 1.15)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(_overlaps(box, b) for b in taken):
                chosen = (t, box)
                break
            t.remove()
        if chosen is None and not optional:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=_OFFSETS[0], **style)
            chosen = (t, t.get_window_extent(renderer))
        if chosen is not None:
            taken.append(chosen[1])
            kept.append(chosen[0])
    return kept


def plot_fixes(network: Network, fixes: Sequence[dict[str, Any]], path: str | Path, *,
               truths: Sequence[dict[str, Any] | None] | None = None, title: str | None = None,
               margin_km: float = 40.0) -> Path:
    """Draw the fixes (``heimdall.fix/v1`` dicts) over the network and the basemap; write a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    km = lambda lat, lon: tuple(v / 1e3 for v in network.to_enu(np.asarray(lat, float), np.asarray(lon, float)))  # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    truths = list(truths) if truths is not None else [None] * len(fixes)
    # the extent: receivers, fixes (with their 95 % ellipses, up to a point) and truths, plus a margin
    pts = [km(r.lat, r.lon) for r in network.receivers]
    for f in fixes:
        pts.append((f["position"]["east_m"] / 1e3, f["position"]["north_m"] / 1e3))
    pts += [km(t["lat"], t["lon"]) for t in truths if t is not None]
    xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
    x0, x1 = xs.min() - margin_km, xs.max() + margin_km
    y0, y1 = ys.min() - margin_km, ys.max() + margin_km

    base = load_basemap()
    for key, style in (("coast", {"color": "#3b6ea8", "lw": 1.0}), ("borders", {"color": "#777777", "lw": 0.9, "ls": "-."})):
        for line in base[key]:
            lon, lat = np.array(line, float).T
            e, n = km(lat, lon)
            ax.plot(e, n, zorder=1, label=None, **style)
    graticule = []  # every half degree, labelled where it leaves the map on the left and at the bottom
    for lat in np.arange(43.0, 47.51, 0.5):
        lon = np.linspace(4.5, 11.5, 200)
        graticule.append((f"{lat:.1f}°N", *km(np.full_like(lon, lat), lon), "left"))
    for lon in np.arange(5.0, 11.01, 0.5):
        lat = np.linspace(42.5, 48.0, 200)
        graticule.append((f"{lon:.1f}°E", *km(lat, np.full_like(lat, lon)), "bottom"))
    cities = [c for c in base["cities"] if x0 <= km(c["lat"], c["lon"])[0] <= x1 and y0 <= km(c["lat"], c["lon"])[1] <= y1]
    ce = np.array([km(c["lat"], c["lon"]) for c in cities], float).reshape(-1, 2)
    if len(ce):
        ax.scatter(ce[:, 0], ce[:, 1], s=[6 + 14 * (c["population"] >= 500_000) for c in cities], c="#555555",
                   zorder=2, label="cities ≥ 50,000")

    sites: dict[tuple[float, float], list[str]] = {}
    for r in network.receivers:  # co-located receivers (giaveno, coazze) share one label
        sites.setdefault(km(r.lat, r.lon), []).append(r.id)
    se = np.array(list(sites), float)
    ax.scatter(se[:, 0], se[:, 1], marker="^", s=70, c="black", zorder=5, label="receivers")
    for i, fix in enumerate(fixes):
        c = colors[i % len(colors)]
        center = np.array([fix["position"]["east_m"], fix["position"]["north_m"]])
        cov = np.array(fix["uncertainty"]["covariance_enu_m2"])
        for p, style in ((0.68, "-"), (0.95, "--")):
            ring = ellipse_polygon_enu(center, cov / ellipse_scale(p) ** 2 * ellipse_radius(fix, p) ** 2, p) / 1e3
            ax.plot(ring[:, 0], ring[:, 1], style, color=c, lw=1.2, zorder=4,
                    label=f"{int(p * 100)} % ellipse" if i == 0 else None)
        ax.plot(center[0] / 1e3, center[1] / 1e3, "o", color=c, ms=7, zorder=6, label="fix" if i == 0 else None)
        truth = truths[i] if i < len(truths) else None
        if truth is not None:
            te, tn = km(truth["lat"], truth["lon"])
            ax.plot(te, tn, "x", color=c, ms=9, mew=2, zorder=6, label="truth" if i == 0 else None)
            ax.plot([te, center[0] / 1e3], [tn, center[1] / 1e3], ":", color=c, lw=1, zorder=3)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    for text, e, n, edge in graticule:
        ax.plot(e, n, color="#cccccc", lw=0.6, zorder=0)
        inside = (e >= x0) & (e <= x1) & (n >= y0) & (n <= y1)
        if not inside.any():
            continue
        k = int(np.argmin(e[inside])) if edge == "left" else int(np.argmin(n[inside]))
        ax.annotate(text, (e[inside][k], n[inside][k]), textcoords="offset points",
                    xytext=(2, 2) if edge == "left" else (2, 2), fontsize=6, color="#999999", zorder=0)
    ax.set_aspect("equal")  # one kilometre is one kilometre both ways: ellipses keep their shape
    ax.set_xlabel(f"east of {network.origin_lat:.2f}° N {network.origin_lon:.2f}° E (km)")
    ax.set_ylabel("north (km)")
    legend = ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(title or f"heimdall fixes ({len(fixes)})")
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    markers = [ax.transData.transform((x, y)) for x, y in [*map(tuple, se), *map(tuple, ce)]]
    avoid = [legend.get_window_extent(renderer)] + [
        matplotlib.transforms.Bbox.from_extents(mx - 3, my - 3, mx + 3, my + 3) for mx, my in markers]
    labels = [(" / ".join(ids), e, n, {"fontsize": 8, "fontweight": "bold", "zorder": 7})
              for (e, n), ids in sites.items()]
    order = sorted(range(len(cities)), key=lambda k: -cities[k]["population"])
    labels += [(cities[k]["name"], ce[k, 0], ce[k, 1], {"fontsize": 7, "color": "#333333", "zorder": 7}) for k in order]
    place_labels(ax, labels, avoid=avoid, optional_from=len(sites))
    fig.text(0.99, 0.005, "coast and borders: Natural Earth (public domain); cities: GeoNames (CC BY 4.0)",
             ha="right", va="bottom", fontsize=6, color="#777777")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
