"""The ONNX Runtime session: load, check against the model contract, run.

onnxruntime's exceptions are translated here into :class:`ModelLoadError` / :class:`InferenceError`;
nothing above this module sees them. Create one :class:`ModelSession` per process, after fork.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ..errors import InferenceError, ModelLoadError
from .spec import METADATA_KEY, ModelSpec
from .types import Features, Mask

__all__ = ["ModelSession", "SessionOptions", "default_model_path", "shipped_model_path", "shipped_models", "card_path",
           "SHIPPED_MODELS"]

SHIPPED_MODELS = {"2m": "localization_model.onnx", "70cm": "localization_model_70cm.onnx"}
"""The reference models shipped inside the package, one per band of the network."""


def shipped_model_path(band: str = "2m") -> Path:
    """The reference model of ``band`` shipped inside the package."""
    return Path(__file__).resolve().parent.parent / "models" / SHIPPED_MODELS[band]


def shipped_models() -> dict[str, Path]:
    """Every shipped model by band."""
    return {band: shipped_model_path(band) for band in SHIPPED_MODELS}


def default_model_path() -> Path:
    """The reference model shipped inside the package for the network's main band (2 m)."""
    return shipped_model_path("2m")


def card_path(model_path: Path) -> Path:
    """The model card beside a model file: ``MODEL_CARD.md`` for ``localization_model.onnx``,
    ``MODEL_CARD_<x>.md`` for ``localization_model_<x>.onnx``, else ``MODEL_CARD.md``."""
    stem = Path(model_path).stem
    suffix = stem[len("localization_model"):] if stem.startswith("localization_model_") else ""
    return Path(model_path).with_name(f"MODEL_CARD{suffix}.md")


@dataclass(frozen=True, kw_only=True)
class SessionOptions:
    """How onnxruntime may use the machine."""

    intra_op_threads: int = 1  #: threads per session; N worker children x this should not exceed the cores
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  #: e.g. ("CUDAExecutionProvider", "CPUExecutionProvider")


class ModelSession:
    """A warm onnxruntime session and the model's parsed metadata."""

    def __init__(self, path: str | Path | None = None, options: SessionOptions | None = None) -> None:
        path = Path(path) if path is not None else default_model_path()
        options = options or SessionOptions()
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read model file {path}: {exc}") from exc
        self.path = path
        self.sha256 = hashlib.sha256(blob).hexdigest()
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, options.intra_op_threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(blob, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        meta = self._session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ModelLoadError(f"{path.name} has no '{METADATA_KEY}' metadata (the heimdall.model/v1 contract)")
        self.spec = ModelSpec.from_json(meta[METADATA_KEY])
        self.providers: list[str] = self._session.get_providers()
        self._check_io()

    def _check_io(self) -> None:
        ins = {i.name: i.shape for i in self._session.get_inputs()}
        outs = {o.name: o.shape for o in self._session.get_outputs()}
        r, (m, t) = len(self.spec.network), (self.spec.features.n_mels, self.spec.features.frames)
        want_in = {"features": [r, m, t], "mask": [r]}
        for name, tail in want_in.items():
            if name not in ins or list(ins[name][1:]) != tail:
                raise ModelLoadError(f"input {name} must be [batch, {', '.join(map(str, tail))}], model has "
                                     f"{ins.get(name)}")
        for name, width in (("mean", 2), ("cov", 3)):
            if name not in outs or list(outs[name][1:]) != [width]:
                raise ModelLoadError(f"output {name} must be [batch, {width}], model has {outs.get(name)}")

    def run(self, features: Features, mask: Mask) -> tuple[np.ndarray, np.ndarray]:
        """Run one batch: returns (mean [B, 2] metres, cov parameters [B, 3])."""
        try:
            mean, cov = self._session.run(["mean", "cov"], {"features": features, "mask": mask})
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed on a batch of {len(mask)}: {exc}") from exc
        return mean, cov

    def info(self, providers: Sequence[str] | None = None) -> dict:
        """Name, version, file hash, providers and the model card (the ``model_info`` answer)."""
        return {"name": self.spec.name, "version": self.spec.version, "sha256": self.sha256,
                "path": str(self.path), "providers": list(providers or self.providers),
                "receivers": list(self.spec.network.ids), "sample_rate_hz": self.spec.sample_rate_hz,
                "snippet_samples": self.spec.snippet_samples, "bands_hz": [list(b) for b in self.spec.bands_hz],
                "uncertainty": self.spec.uncertainty, "card": self.spec.card}
