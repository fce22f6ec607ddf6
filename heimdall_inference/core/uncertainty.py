"""Covariance -> confidence ellipses and a GeoJSON polygon (the fix contract).

For a 2-D Gaussian with covariance ``P`` the region ``d^T P^-1 d <= k^2`` holds probability
``p = chi2.cdf(k^2, 2)``, so the ellipse scale for confidence ``p`` is ``k = sqrt(chi2.ppf(p, 2))``
(2.447 for 95 %), computed here from scipy, not read from a table. A model whose metadata declares
a Student-t predictive distribution (``uncertainty: {"family": "student_t", "dof": nu}``) gets the
same ellipse shape with the F-distribution radius (see :func:`ellipse_scale`). The semi-axes are ``k`` times the
square roots of ``P``'s eigenvalues; the orientation is the major axis' bearing, degrees clockwise
from true north, in [0, 180).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2
from scipy.stats import f as f_dist

from .network import Network

__all__ = ["Ellipse", "covariance_from_params", "ellipse_scale", "ellipses", "ellipse_axes", "ellipse_rings_enu",
           "ellipse_polygon_enu", "ellipse_geojson", "ellipse_geojson_batch", "geojson_polygons",
           "mahalanobis_sq"]

DEFAULT_CONFIDENCES = (0.68, 0.95)


@dataclass(frozen=True, slots=True)
class Ellipse:
    confidence: float
    semi_major_m: float
    semi_minor_m: float
    orientation_deg: float  #: major axis, clockwise from true north, [0, 180)

    def to_dict(self) -> dict[str, float]:
        return {"confidence": self.confidence, "semi_major_m": round(self.semi_major_m, 1),
                "semi_minor_m": round(self.semi_minor_m, 1), "orientation_deg": round(self.orientation_deg, 2)}


def covariance_from_params(params: np.ndarray) -> np.ndarray:
    """[..., 3] (log sigma_e, log sigma_n, rho) -> [..., 2, 2] east/north covariance in m^2."""
    params = np.asarray(params, np.float64)
    se, sn, rho = np.exp(params[..., 0]), np.exp(params[..., 1]), params[..., 2]
    cov = np.empty(params.shape[:-1] + (2, 2))
    cov[..., 0, 0] = se * se
    cov[..., 1, 1] = sn * sn
    cov[..., 0, 1] = cov[..., 1, 0] = rho * se * sn
    return cov


@functools.lru_cache(maxsize=64)
def _scale(confidence: float, dof: float | None) -> float:
    return float(ellipse_scale(confidence, dof))


def ellipse_scale(confidence: float | np.ndarray, dof: float | None = None) -> np.ndarray:
    """Mahalanobis radius k (in units of the covariance) of the 2-D region holding ``confidence``.

    Gaussian (``dof`` None): ``sqrt(chi2.ppf(p, 2))``. Student-t with ``dof`` degrees of freedom and
    covariance ``P`` (scale matrix ``P (dof - 2) / dof``): ``d^T P^-1 d * dof / (2 (dof - 2))`` is
    F(2, dof), so ``k = sqrt(2 f.ppf(p, 2, dof) (dof - 2) / dof)``; it tends to the chi-square
    radius as ``dof`` grows.
    """
    if dof is None or not np.isfinite(dof):
        return np.sqrt(chi2.ppf(confidence, 2))
    if dof <= 2:
        raise ValueError("a Student-t covariance needs more than 2 degrees of freedom")
    return np.sqrt(2.0 * f_dist.ppf(confidence, 2, dof) * (dof - 2.0) / dof)


def mahalanobis_sq(delta: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """[..., 2] offsets and [..., 2, 2] covariances -> [...] squared Mahalanobis distance."""
    return np.einsum("...i,...i->...", delta, np.linalg.solve(cov, delta[..., None])[..., 0])


def _axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of [..., 2, 2]: (major variance, minor variance, bearing of major deg)."""
    vals, vecs = np.linalg.eigh(cov)  # ascending
    major = vecs[..., :, 1]  # (east, north) components
    bearing = np.degrees(np.arctan2(major[..., 0], major[..., 1])) % 180.0
    return np.maximum(vals[..., 1], 0.0), np.maximum(vals[..., 0], 0.0), bearing


def ellipses(cov: np.ndarray, confidences: tuple[float, ...] = DEFAULT_CONFIDENCES,
             dof: float | None = None) -> list[Ellipse]:
    """The confidence ellipses of one 2x2 covariance (Gaussian, or Student-t with ``dof``)."""
    vmaj, vmin, bearing = _axes(np.asarray(cov, float))
    return [Ellipse(confidence=p, semi_major_m=float(k * np.sqrt(vmaj)), semi_minor_m=float(k * np.sqrt(vmin)),
                    orientation_deg=float(bearing))
            for p, k in zip(confidences, np.atleast_1d(ellipse_scale(np.asarray(confidences), dof)))]


def ellipse_axes(cov: np.ndarray, confidences: tuple[float, ...], dof: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised over [B, 2, 2]: (semi-major [B, P], semi-minor [B, P], bearing of major [B] deg)."""
    vmaj, vmin, bearing = _axes(np.asarray(cov, float))
    k = np.array([_scale(float(p), dof) for p in confidences])
    return np.sqrt(vmaj)[:, None] * k, np.sqrt(vmin)[:, None] * k, bearing


def ellipse_rings_enu(centers_enu: np.ndarray, cov: np.ndarray, confidence: float, points: int = 72,
                      dof: float | None = None) -> np.ndarray:
    """Vectorised rings: [B, points + 1, 2] east/north metres, closed, counter-clockwise."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, float))  # [B, 2], [B, 2, 2]
    theta = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    unit = np.stack([np.cos(theta), np.sin(theta)], axis=1)  # [N, 2]
    # a right-handed eigenvector basis keeps the parameterisation counter-clockwise in (east, north)
    vecs = vecs.copy()
    vecs[np.linalg.det(vecs) < 0, :, 0] *= -1.0
    scaled = unit[None] * np.sqrt(np.maximum(vals, 0.0))[:, None, :]  # [B, N, 2]
    ring = np.asarray(centers_enu, float)[:, None, :] + _scale(confidence, dof) * np.einsum("bnj,bij->bni", scaled, vecs)
    return np.concatenate([ring, ring[:, :1]], axis=1)


def ellipse_polygon_enu(center_enu: np.ndarray, cov: np.ndarray, confidence: float, points: int = 72,
                        dof: float | None = None) -> np.ndarray:
    """[points + 1, 2] closed ring of east/north metres on the ellipse boundary."""
    k = ellipse_scale(confidence, dof)
    vals, vecs = np.linalg.eigh(np.asarray(cov, float))
    theta = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    unit = np.stack([np.cos(theta), np.sin(theta)], axis=1) * np.sqrt(np.maximum(vals, 0.0))
    ring = np.asarray(center_enu, float) + k * unit @ vecs.T
    return np.vstack([ring, ring[:1]])


def ellipse_geojson(network: Network, center_enu: np.ndarray, cov: np.ndarray, confidence: float = 0.95,
                    points: int = 72, dof: float | None = None) -> dict:
    """A GeoJSON Feature whose Polygon is the ellipse in lon/lat (through the tangent plane)."""
    return ellipse_geojson_batch(network, np.asarray(center_enu)[None], np.asarray(cov)[None], confidence,
                                 points, dof)[0]


def ellipse_geojson_batch(network: Network, centers_enu: np.ndarray, cov: np.ndarray, confidence: float = 0.95,
                          points: int = 72, dof: float | None = None) -> list[dict]:
    """GeoJSON Features for [B] ellipses with one geodetic conversion for all their vertices."""
    rings = ellipse_rings_enu(centers_enu, cov, confidence, points, dof)  # [B, N + 1, 2], counter-clockwise
    lat, lon = network.to_geodetic(rings[..., 0].ravel(), rings[..., 1].ravel())
    return geojson_polygons(lon.reshape(rings.shape[:2]), lat.reshape(rings.shape[:2]), confidence)


def geojson_polygons(lon: np.ndarray, lat: np.ndarray, confidence: float) -> list[dict]:
    """[B, N + 1] closed counter-clockwise rings in degrees -> GeoJSON Polygon Features (RFC 7946)."""
    rings = np.stack([np.round(lon, 6), np.round(lat, 6)], axis=-1)  # [B, N + 1, 2]
    rings[:, -1] = rings[:, 0]  # closed exactly (RFC 7946)
    return [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]},
             "properties": {"confidence": confidence}} for coords in rings.tolist()]  # one conversion for the batch
