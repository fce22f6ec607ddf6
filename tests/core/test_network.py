"""The receiver network is data and its tangent plane is exact."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.core.network import Network, reference_network


def test_reference_network_matches_design():
    net = reference_network()
    assert net.ids == ("giaveno", "montanaro", "torino", "coazze", "passo_giovi", "genova", "milano")
    torino = net.receivers[net.index["torino"]]
    assert (torino.lat, torino.lon) == (45.044, 7.672)
    assert net.origin_lat == pytest.approx(np.mean([r.lat for r in net.receivers]))


def test_enu_round_trip_and_scale():
    net = reference_network()
    lat, lon = net.to_geodetic(np.array([10_000.0, -50_000.0]), np.array([0.0, 20_000.0]))
    e, n = net.to_enu(lat, lon)
    # sea-level points vs the tangent plane: metres at 50 km, nothing next to a fix's uncertainty
    np.testing.assert_allclose(e, [10_000.0, -50_000.0], rtol=1e-4)
    np.testing.assert_allclose(n, [0.0, 20_000.0], atol=2.0)
    # one degree of latitude is ~111.1 km here
    e0, n0 = net.to_enu(net.origin_lat + 1.0, net.origin_lon)
    assert float(n0) == pytest.approx(111_140, rel=2e-3)


def test_from_dict_round_trip_and_duplicates():
    net = reference_network()
    again = Network.from_dict(net.to_dict())
    assert again == net
    doc = net.to_dict()
    doc["receivers"].append(dict(doc["receivers"][0]))
    with pytest.raises(ValueError):
        Network.from_dict(doc)
