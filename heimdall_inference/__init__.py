"""heimdall-inference: locate radio transmitters from WebSDR IQ snippets with a warm ONNX model.

The plain library (no Celery needed): :class:`Localizer` decodes ``heimdall.iq/v1`` payloads,
computes log-mel features from the model's metadata, runs the ONNX session and returns
``heimdall.fix/v1`` documents with calibrated uncertainty ellipses.
"""

from __future__ import annotations

from .errors import (
    HeimdallError,
    InferenceError,
    ModelError,
    ModelLoadError,
    PayloadCode,
    PayloadError,
    StorageError,
    TransientError,
)
from .network import Network, Receiver, reference_network
from .payload import DecodedPayload, Limits, PayloadDecoder
from .pipeline import Localizer
from .session import ModelSession, SessionOptions, default_model_path
from .spec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    # the pipeline
    "Localizer",
    "ModelSession",
    "SessionOptions",
    "default_model_path",
    "ModelSpec",
    # payloads
    "PayloadDecoder",
    "DecodedPayload",
    "Limits",
    # the network
    "Network",
    "Receiver",
    "reference_network",
    # errors
    "HeimdallError",
    "PayloadError",
    "PayloadCode",
    "ModelError",
    "ModelLoadError",
    "InferenceError",
    "StorageError",
    "TransientError",
    "__version__",
]
