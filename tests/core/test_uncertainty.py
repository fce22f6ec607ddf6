"""Ellipse maths against covariances whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from heimdall_inference.core.network import reference_network
from heimdall_inference.core.uncertainty import (
    covariance_from_params,
    ellipse_geojson,
    ellipse_polygon_enu,
    ellipse_scale,
    ellipses,
    mahalanobis_sq,
)


def test_scale_is_the_chi_square_quantile():
    assert ellipse_scale(0.95) == pytest.approx(2.4477, abs=1e-4)
    assert ellipse_scale(0.68) == pytest.approx(np.sqrt(-2 * np.log(1 - 0.68)), rel=1e-12)
    # 2-D chi-square with 2 dof: P(r^2 <= k^2) = 1 - exp(-k^2 / 2)
    for p in (0.5, 0.9, 0.99):
        assert chi2.cdf(ellipse_scale(p) ** 2, 2) == pytest.approx(p)


def test_axis_aligned_covariances():
    east = ellipses(np.diag([4.0e6, 1.0e6]), (0.95,))[0]  # sigma_e 2 km, sigma_n 1 km
    k = ellipse_scale(0.95)
    assert east.semi_major_m == pytest.approx(2000 * k)
    assert east.semi_minor_m == pytest.approx(1000 * k)
    assert east.orientation_deg == pytest.approx(90.0)  # major axis points east
    north = ellipses(np.diag([1.0e6, 9.0e6]), (0.68,))[0]
    assert north.orientation_deg % 180 == pytest.approx(0.0, abs=1e-9)
    assert north.semi_major_m == pytest.approx(3000 * ellipse_scale(0.68))


@pytest.mark.parametrize("bearing_deg", [0.0, 30.0, 45.0, 100.0, 170.0])
def test_rotated_covariance_recovers_bearing(bearing_deg):
    b = np.radians(bearing_deg)
    major = np.array([np.sin(b), np.cos(b)])  # east, north components of a bearing from north
    minor = np.array([np.cos(b), -np.sin(b)])
    cov = 25e6 * np.outer(major, major) + 4e6 * np.outer(minor, minor)
    e = ellipses(cov, (0.95,))[0]
    assert e.orientation_deg == pytest.approx(bearing_deg, abs=1e-6)
    assert e.semi_major_m == pytest.approx(5000 * ellipse_scale(0.95))
    assert e.semi_minor_m == pytest.approx(2000 * ellipse_scale(0.95))


def test_params_to_covariance():
    cov = covariance_from_params(np.array([[np.log(3000.0), np.log(1000.0), -0.5]]))[0]
    np.testing.assert_allclose(cov, [[9e6, -1.5e6], [-1.5e6, 1e6]])
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_polygon_lies_on_the_ellipse_boundary():
    cov = np.array([[9e6, 2e6], [2e6, 4e6]])
    ring = ellipse_polygon_enu(np.array([1000.0, -500.0]), cov, 0.95, points=36)
    assert np.allclose(ring[0], ring[-1])
    d2 = mahalanobis_sq(ring - [1000.0, -500.0], np.broadcast_to(cov, (len(ring), 2, 2)))
    np.testing.assert_allclose(d2, ellipse_scale(0.95) ** 2, rtol=1e-9)


def test_geojson_polygon_is_closed_ccw_and_around_the_centre():
    net = reference_network()
    cov = np.array([[4e8, 1e8], [1e8, 2.5e8]])
    feat = ellipse_geojson(net, np.array([0.0, 0.0]), cov, 0.95)
    ring = np.array(feat["geometry"]["coordinates"][0])
    assert feat["properties"]["confidence"] == 0.95
    assert feat["type"] == "Feature" and feat["geometry"]["type"] == "Polygon"
    assert tuple(ring[0]) == tuple(ring[-1])
    x, y = ring[:, 0], ring[:, 1]
    assert 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0  # counter-clockwise (RFC 7946)
    assert x.min() < net.origin_lon < x.max() and y.min() < net.origin_lat < y.max()
    # the north-south extent matches the ellipse's: k * sqrt(var_n) each way, in degrees of latitude
    half_ns_m = ellipse_scale(0.95) * np.sqrt(cov[1, 1])
    assert (y.max() - y.min()) / 2 * 111_132 == pytest.approx(half_ns_m, rel=0.02)
