"""The model contract (docs/architecture.md): what the ONNX file's ``metadata_props["heimdall"]`` declares.

One JSON document under the key ``heimdall`` holds everything preprocessing and post-processing
need: the receiver network and its order, the tangent-plane origin, the signal (sample rate,
snippet length, full-scale power, bands), the feature plan with its fixed normalisation constants,
the output parameterisation, the model's name/version and the model card figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError
from .features import FeatureConfig
from .network import Network

__all__ = ["METADATA_KEY", "SPEC_FORMAT", "ModelSpec"]

METADATA_KEY = "heimdall"
SPEC_FORMAT = "heimdall.model/v1"


@dataclass(frozen=True)
class ModelSpec:
    """Parsed model metadata."""

    name: str
    version: str
    network: Network
    features: FeatureConfig
    bands_hz: tuple[tuple[float, float], ...]  #: centre frequencies the model was trained for
    min_receivers: int
    max_resample_ratio: int = 8  #: largest up/down factor the worker resamples by
    uncertainty: dict[str, Any] = field(default_factory=lambda: {"family": "gaussian"})
    card: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    #: the quality flag's residual thresholds for this model's band (:mod:`.quality`), measured by the training
    #: script on its nominal world: {"fair_residual_db": 95th percentile, "poor_residual_db": 99.5th}
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def dof(self) -> float | None:
        """Degrees of freedom of a Student-t predictive distribution; None for a Gaussian."""
        if self.uncertainty.get("family") == "student_t":
            return float(self.uncertainty["dof"])
        return None

    @property
    def sample_rate_hz(self) -> float:
        return self.features.sample_rate_hz

    @property
    def snippet_samples(self) -> int:
        return self.features.snippet_samples

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "name": self.name,
            "version": self.version,
            "network": self.network.to_dict(),
            "signal": {"bands_hz": [list(b) for b in self.bands_hz], "min_receivers": self.min_receivers,
                       "max_resample_ratio": self.max_resample_ratio},
            "features": self.features.to_dict(),
            "outputs": {"mean": "east_m, north_m from the network origin",
                        "cov": "log_sigma_east_m, log_sigma_north_m, correlation"},
            "uncertainty": self.uncertainty,
            "card": self.card,
            "training": self.training,
            "quality": self.quality,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Parse the metadata document; raises ModelLoadError when it breaks the contract."""
        try:
            doc = json.loads(text)
            if doc.get("format") != SPEC_FORMAT:
                raise ValueError(f"metadata format {doc.get('format')!r} is not {SPEC_FORMAT}")
            signal = doc["signal"]
            return cls(
                name=str(doc["name"]), version=str(doc["version"]),
                network=Network.from_dict(doc["network"]),
                features=FeatureConfig.from_dict(doc["features"]),
                bands_hz=tuple((float(lo), float(hi)) for lo, hi in signal["bands_hz"]),
                min_receivers=int(signal["min_receivers"]),
                max_resample_ratio=int(signal.get("max_resample_ratio", 8)),
                uncertainty=dict(doc.get("uncertainty") or {"family": "gaussian"}),
                card=dict(doc.get("card") or {}), training=dict(doc.get("training") or {}),
                quality={k: float(v) for k, v in (doc.get("quality") or {}).items()},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"model metadata breaks the contract: {exc}") from exc
