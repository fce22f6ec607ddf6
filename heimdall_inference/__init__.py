"""heimdall-inference: locate radio transmitters from WebSDR IQ snippets with a warm ONNX model.

The plain library (no Celery needed): :class:`Localizer` decodes ``heimdall.iq/v1`` payloads,
computes log-mel features from the model's metadata, runs the ONNX session and returns
``heimdall.fix/v1`` documents with calibrated uncertainty ellipses. Producers use
:mod:`heimdall_inference.client` (``submit``, ``predict``, ``predict_batch``).

The package, by where its code runs (docs/architecture.md has the whole picture):

* ``core/``    the localization library (worker children, the CLI, the lab);
* ``worker/``  everything that knows Celery: the app, tasks, micro-batching, the process context;
* ``store/``   the database, the prediction cache, S3 claim checks (worker children);
* ``ops/``     metrics and health (worker main process and children);
* ``client``   the producer API; ``settings`` and ``errors`` are shared by all;
* ``lab/``, ``bench/``, ``cli/``  tooling: simulator, training, evaluation, benchmarks, commands.
"""

from __future__ import annotations

from .core.localizer import Localizer
from .core.network import Network, Receiver, reference_network
from .core.payload import DecodedPayload, Limits, PayloadDecoder
from .core.session import ModelSession, SessionOptions, default_model_path
from .core.spec import ModelSpec
from .errors import (
    BrokerUnavailable,
    ConfigError,
    HeimdallError,
    InferenceError,
    ModelError,
    ModelLoadError,
    PayloadCode,
    PayloadError,
    ResultUnavailable,
    StorageError,
    TransientError,
)

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
    "BrokerUnavailable",
    "ResultUnavailable",
    "ConfigError",
    "__version__",
]
