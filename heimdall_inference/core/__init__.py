"""The localization library: IQ payloads in, ``heimdall.fix/v1`` documents out; no Celery, no database.

In dependency order: :mod:`.types` (array aliases), :mod:`.network` (receivers and the tangent
plane), :mod:`.features` (the feature plan), :mod:`.spec` (the model contract read from the ONNX
metadata), :mod:`.codec` (wire encodings of ``heimdall.iq/v1``), :mod:`.payload` (decode and
validate, typed errors), :mod:`.session` (the ONNX Runtime session), :mod:`.uncertainty`
(covariance -> ellipses, GeoJSON), :mod:`.fix` (the result document), :mod:`.localizer` (the
batched :class:`Localizer` that ties them together). Used by the worker's children, the CLI's
``predict`` and the lab; imports numpy, scipy, onnxruntime, msgpack and pymap3d only.
"""

from __future__ import annotations

from .localizer import Localizer
from .network import Network, Receiver, reference_network
from .payload import DecodedPayload, Limits, PayloadDecoder
from .session import ModelSession, SessionOptions, default_model_path
from .spec import ModelSpec

__all__ = ["Localizer", "Network", "Receiver", "reference_network", "DecodedPayload", "Limits", "PayloadDecoder",
           "ModelSession", "SessionOptions", "default_model_path", "ModelSpec"]
