"""The receiver network as data, and the local tangent plane the model works in.

The network (ids, names, positions, and their order in the model's receiver axis) is data: the
simulator reads it from ``data/reference_network.json``, the training script copies it into the
model's metadata, and the worker reads it back from the model. Positions are WGS84 at sea level;
east/north metres are taken in the east-north-up tangent plane at the network origin (the mean of
the receivers' latitudes and longitudes) with pymap3d's exact geodetic <-> ENU conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import pymap3d

from .types import FloatArray

__all__ = ["Receiver", "Network", "reference_network"]


@dataclass(frozen=True, slots=True)
class Receiver:
    """One WebSDR station."""

    id: str
    name: str
    lat: float
    lon: float


@dataclass(frozen=True)
class Network:
    """An ordered receiver table and its tangent-plane origin."""

    name: str
    receivers: tuple[Receiver, ...]
    origin_lat: float
    origin_lon: float

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "Network":
        """Build from ``{"name", "receivers": [{"id","name","lat","lon"}], "origin"?: {"lat","lon"}}``."""
        receivers = tuple(
            Receiver(id=str(r["id"]), name=str(r.get("name", r["id"])), lat=float(r["lat"]), lon=float(r["lon"]))
            for r in doc["receivers"]
        )
        if len({r.id for r in receivers}) != len(receivers):
            raise ValueError("receiver ids must be unique")
        origin = doc.get("origin") or {
            "lat": float(np.mean([r.lat for r in receivers])),
            "lon": float(np.mean([r.lon for r in receivers])),
        }
        return cls(name=str(doc.get("name", "network")), receivers=receivers,
                   origin_lat=float(origin["lat"]), origin_lon=float(origin["lon"]))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in the model metadata."""
        return {
            "name": self.name,
            "origin": {"lat": self.origin_lat, "lon": self.origin_lon},
            "receivers": [{"id": r.id, "name": r.name, "lat": r.lat, "lon": r.lon} for r in self.receivers],
        }

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.receivers)

    @property
    def index(self) -> dict[str, int]:
        """Receiver id -> slot on the model's receiver axis."""
        return {r.id: i for i, r in enumerate(self.receivers)}

    def __len__(self) -> int:
        return len(self.receivers)

    def to_enu(self, lat: FloatArray | float, lon: FloatArray | float) -> tuple[FloatArray, FloatArray]:
        """Geodetic degrees -> (east_m, north_m) in the tangent plane at the origin."""
        e, n, _ = pymap3d.geodetic2enu(np.asarray(lat, float), np.asarray(lon, float), 0.0,
                                        self.origin_lat, self.origin_lon, 0.0)
        return np.asarray(e, float), np.asarray(n, float)

    def to_geodetic(self, east_m: FloatArray | float, north_m: FloatArray | float) -> tuple[FloatArray, FloatArray]:
        """(east_m, north_m) in the tangent plane -> geodetic (lat, lon) degrees."""
        lat, lon, _ = pymap3d.enu2geodetic(np.asarray(east_m, float), np.asarray(north_m, float), 0.0,
                                           self.origin_lat, self.origin_lon, 0.0)
        return np.asarray(lat, float), np.asarray(lon, float)

    def receiver_enu(self) -> FloatArray:
        """[receivers, 2] east/north metres of every receiver, in model order."""
        e, n = self.to_enu([r.lat for r in self.receivers], [r.lon for r in self.receivers])
        return np.stack([e, n], axis=-1)


def reference_network() -> Network:
    """The reference deployment (seven WebSDR stations in north-west Italy), read from the package data."""
    text = resources.files("heimdall_inference.data").joinpath("reference_network.json").read_text()
    return Network.from_dict(json.loads(text))
