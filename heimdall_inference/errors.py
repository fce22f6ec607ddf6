"""The one error tree of heimdall-inference.

::

    HeimdallError
    ├── PayloadError            invalid input: never retried, reported as {"code", "message", "field"}
    ├── ModelError
    │   ├── ModelLoadError      the ONNX file or its metadata cannot be used
    │   ├── InferenceError      onnxruntime failed while running the session
    │   └── RegistryError       the model registry refused a request, or a version is not acceptable
    │       ├── RegistryUnavailable  the registry (or its artifact store) did not answer
    │       └── RegistryNotFound     no such registered model, alias or version
    ├── StorageError            a store refused a write or read for good
    ├── TransientError          marker: a retry may succeed (broker, database, cache blips)
    │   ├── BrokerUnavailable   a producer could not publish, even after its retries
    │   └── ResultUnavailable   the task was published, its result cannot be read now (Redis down)
    └── ConfigError             settings or installed versions the service cannot run with (also a ValueError)

Third-party exceptions (onnxruntime, json, msgpack, binascii, ...) are translated where they are
raised, in the module that calls the library; nothing above those modules catches a library's
exception type. Errors carry context (code, field, receiver id, sizes), never the IQ arrays.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HeimdallError",
    "PayloadError",
    "ModelError",
    "ModelLoadError",
    "InferenceError",
    "RegistryError",
    "RegistryUnavailable",
    "RegistryNotFound",
    "StorageError",
    "TransientError",
    "BrokerUnavailable",
    "ResultUnavailable",
    "ConfigError",
    "PayloadCode",
]


class HeimdallError(Exception):
    """Base of every error this package raises on purpose."""


class PayloadCode:
    """Stable machine-readable codes of :class:`PayloadError` (the payload contract, docs/architecture.md)."""

    DECODE_ERROR = "decode_error"  #: the bytes are not JSON/msgpack, or not an object
    PAYLOAD_TOO_LARGE = "payload_too_large"  #: over the configured byte cap
    UNKNOWN_SCHEMA = "unknown_schema"  #: "schema" is not heimdall.iq/v1
    MISSING_FIELD = "missing_field"  #: a required field is absent
    INVALID_FIELD = "invalid_field"  #: a field has the wrong type or an impossible value
    UNKNOWN_RECEIVER = "unknown_receiver"  #: a receiver id the model's network does not know
    DUPLICATE_RECEIVER = "duplicate_receiver"  #: the same receiver twice
    TOO_FEW_RECEIVERS = "too_few_receivers"  #: fewer than the model's minimum (3)
    TOO_MANY_RECEIVERS = "too_many_receivers"  #: more receivers than the network has
    BAD_BASE64 = "bad_base64"  #: the IQ data is not valid base64
    UNSUPPORTED_DTYPE = "unsupported_dtype"  #: IQ dtype other than ci16 / complex64
    WRONG_LENGTH = "wrong_length"  #: byte count not a whole number of samples, or too few/many samples
    NON_FINITE = "non_finite"  #: NaN or Inf in complex64 IQ
    OUT_OF_RANGE = "out_of_range"  #: samples beyond any level a receiver can hear (Limits.max_sample_magnitude)
    UNSUPPORTED_SAMPLE_RATE = "unsupported_sample_rate"  #: cannot be resampled to the model's rate
    UNSUPPORTED_FREQUENCY = "unsupported_frequency"  #: centre frequency outside the model's bands
    IQ_REF_UNAVAILABLE = "iq_ref_unavailable"  #: an iq_ref claim check could not be fetched
    UNKNOWN_MODEL = "unknown_model"  #: options.model names a model (alias or version) this worker does not serve
    CONFLICT = "conflict"  #: a request_id already stored for the same capture time with other IQ


class PayloadError(HeimdallError):
    """The input breaks the payload contract. Never retried; the worker stays healthy.

    Attributes:
        code: one of :class:`PayloadCode`.
        message: a sentence for a human.
        field: JSON-pointer-like path of the offending field (``receivers[2].iq.data``), or None.
        context: small JSON-serialisable facts (sizes, receiver id); never the IQ itself.
    """

    def __init__(self, code: str, message: str, field: str | None = None, **context: Any) -> None:
        # args carry (code, message, field) so that Celery's JSON exception envelope rebuilds the
        # same typed error on the client side
        super().__init__(code, message, field)
        self.code = code
        self.message = message
        self.field = field
        self.context = context

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        return f"{self.code}: {self.message}{where}"

    def to_dict(self) -> dict[str, Any]:
        """The structured error result: ``{"code", "message", "field"}`` plus context."""
        out: dict[str, Any] = {"code": self.code, "message": self.message, "field": self.field}
        if self.context:
            out["context"] = dict(self.context)
        return out

    def __repr__(self) -> str:
        return f"PayloadError(code={self.code!r}, field={self.field!r}, message={self.message!r})"

    def __reduce__(self):  # keeps the error picklable for multiprocessing (never on the wire)
        return (_rebuild_payload_error, (self.code, self.message, self.field, self.context))


def _rebuild_payload_error(code: str, message: str, field: str | None, context: dict) -> PayloadError:
    return PayloadError(code, message, field, **context)


class ModelError(HeimdallError):
    """The model cannot be loaded or run."""


class ModelLoadError(ModelError):
    """The ONNX file, its inputs/outputs or its metadata break the model contract (docs/architecture.md)."""


class InferenceError(ModelError):
    """onnxruntime failed while running the session."""


class RegistryError(ModelError):
    """The model registry (MLflow) refused a request, or a registered version is not acceptable
    (no such alias, a checksum or contract mismatch)."""


class RegistryUnavailable(RegistryError):
    """The registry or its artifact store did not answer (a worker falls back to its cached version)."""


class RegistryNotFound(RegistryError):
    """The registry has no such model, alias or version (an experiment arm whose alias is not set is left out)."""


class StorageError(HeimdallError):
    """A store refused an operation for good (a retry would not help)."""


class TransientError(HeimdallError):
    """Marker for failures a retry may cure (connection refused, timeouts)."""


class BrokerUnavailable(TransientError):
    """A producer could not hand a task to the broker, even after retrying for a while: nothing was sent."""


class ResultUnavailable(TransientError):
    """The task was published (its fix still reaches the database), but its result cannot be read:
    the result backend (Redis) does not answer. Ask again later, or read the fix from the database."""


class ConfigError(HeimdallError, ValueError):
    """Settings (``HEIMDALL_*``) or installed library versions the service cannot run with.

    Raised at start-up with one line naming each offending variable, never later in a task.
    """
