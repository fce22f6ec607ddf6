"""The model lifecycle: which ONNX file a worker serves, and where it comes from.

* :mod:`.uri`: ``HEIMDALL_MODEL_URI`` parsed (the shipped model, a file, ``models:/name@alias`` or
  ``models:/name/version``);
* :mod:`.mlflow_registry`: the MLflow 3 registry (versions, aliases, artifacts in S3), its errors
  translated into :class:`~heimdall_inference.errors.RegistryError`;
* :mod:`.cache`: verified downloads on this host, one directory per version, written atomically;
* :mod:`.verify`: the model contract checked in a process of its own (no ONNX session before fork);
* :mod:`.resolve`: all of it together, in a worker's main process at start (:class:`ModelSet`: the
  worker's own model and the others its routes name);
* :mod:`.routes`: the A/B split, the shadow and the ``options.model`` allow-list, as settings.
"""

from .resolve import ModelSet, ResolvedModel, resolve_model
from .routes import Routes, parse_routes
from .uri import ModelUri, parse_model_uri

__all__ = ["ModelUri", "parse_model_uri", "ResolvedModel", "ModelSet", "resolve_model", "Routes", "parse_routes"]
