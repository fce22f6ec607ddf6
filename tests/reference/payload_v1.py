"""The payload decoder before the fast paths (frozen; tests only): the reference for tests/core/test_parity.py.

Every rule breaks with a :class:`~heimdall_inference.errors.PayloadError` carrying a code from
:class:`~heimdall_inference.errors.PayloadCode`, a message and the offending field; nothing else
escapes :meth:`PayloadDecoder.decode`. Sizes are checked before anything is allocated from them:
the byte cap on the whole payload, the receiver count against the network, and each receiver's
sample count against the cap before its base64 is decoded.

A decoded payload's IQ is at the model's sample rate (``scipy.signal.resample_poly`` for a rational
ratio no larger than the model's ``max_resample_ratio``), in full-scale units with the receiver's
``gain_db`` removed, and cut to the model's snippet length (longer snippets keep their first
``snippet_samples`` samples; shorter ones are rejected).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import numpy as np
import scipy.signal

from heimdall_inference.core.codec import DTYPES, SCHEMA_IQ, iq_from_bytes, loads_raw
from heimdall_inference.errors import PayloadCode as C
from heimdall_inference.errors import PayloadError, TransientError
from heimdall_inference.core.spec import ModelSpec
from heimdall_inference.core.types import IQ

__all__ = ["Limits", "PayloadOptions", "DecodedPayload", "PayloadDecoder", "IqRefFetcher", "is_valid_id"]

IqRefFetcher = Callable[[str], bytes]
"""Fetches the ``.npy`` bytes behind an ``iq_ref`` claim check (e.g. ``s3://bucket/key.npy``)."""

_MAX_ID_CHARS = 128
_EARLIEST_CAPTURE = datetime(2000, 1, 1, tzinfo=timezone.utc)
"""captured_at is part of the idempotency key and makes hypertable chunks: no year 1 or 9999."""
_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f]+$")
"""An S3 URL the producer can fix if it is wrong: a valid bucket name and a printable key (a malformed
one would otherwise reach boto3 and come back as a "store unreachable" retry)."""


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Caps applied before any work is done."""

    max_payload_bytes: int = 8 * 1024 * 1024  #: serialized payload (or sum of its IQ data)
    max_samples_per_receiver: int = 1 << 18  #: 262,144 samples (21.8 s at 12 kHz)
    #: largest |I| or |Q| after the receiver's gain_db is removed, in full-scale units: 1e4 is +80 dB over
    #: full scale (+70 dBm, 10 W, at the reference model's -10 dBm full scale), beyond any receiver input;
    #: larger finite values would overflow the float32 features into NaN
    max_sample_magnitude: float = 1e4
    #: everything in a payload object but its IQ data (ids, options, unknown fields): a producer's 20 MB
    #: string in an unknown field is refused, not carried into the worker, the cache and the database
    max_metadata_bytes: int = 64 * 1024
    #: how far ahead of the worker's clock ``captured_at`` may be (clock skew between hosts)
    max_clock_skew_s: float = 86_400.0


@dataclass(frozen=True, slots=True)
class PayloadOptions:
    cache: bool = True  #: may the prediction cache answer this payload
    model: str | None = None  #: requested model alias or version


@dataclass(frozen=True, slots=True)
class DecodedPayload:
    """A validated payload, ready for the feature plan."""

    captured_at: str  #: ISO 8601 UTC, millisecond precision, "Z"
    center_freq_hz: float
    sample_rate_hz: float  #: as sent (the IQ below is at the model's rate)
    receiver_ids: tuple[str, ...]
    iq: IQ  #: [receivers, snippet_samples] complex64, full-scale units, gain removed
    request_id: str | None = None
    session_id: str | None = None
    options: PayloadOptions = field(default_factory=PayloadOptions)
    digest: str = ""  #: hash of receiver ids, encodings and IQ bytes (the cache key's payload part)
    size_bytes: int = 0  #: IQ bytes on the wire


class _NoHash:
    """Stands in for the hash when no digest is wanted."""

    def update(self, _: bytes) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def is_valid_id(v: Any) -> bool:
    """Is this a valid ``request_id`` / ``session_id``: a printable string of 1-128 characters?"""
    return isinstance(v, str) and 0 < len(v) <= _MAX_ID_CHARS and v.isprintable()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metadata_bytes(doc: dict[str, Any], *, stop_after: int) -> int:
    """About how many bytes a parsed payload holds besides its IQ data (``receivers[i].iq.data``):
    strings and bytes by length, keys too, 8 per other scalar. Iterative; stops once past ``stop_after``."""
    # each stack entry: (object, role) with role "doc", "receivers", "receiver", "iq" or "" (anything else)
    child_role = {("doc", "receivers"): "receivers", ("receiver", "iq"): "iq"}
    total = 0
    stack: list[tuple[Any, str]] = [(doc, "doc")]
    while stack and total <= stop_after:
        obj, role = stack.pop()
        if isinstance(obj, dict):
            for k, v in obj.items():
                total += len(k) if isinstance(k, str) else 8
                if role == "iq" and k == "data":
                    continue
                stack.append((v, child_role.get((role, k), "")))
        elif isinstance(obj, list):
            total += 8 * len(obj)
            stack.extend((v, "receiver" if role == "receivers" else "") for v in obj)
        elif isinstance(obj, (str, bytes, bytearray, memoryview)):
            total += len(obj)
        else:
            total += 8
    return total


class PayloadDecoder:
    """Turns raw bytes or a parsed dict into a :class:`DecodedPayload` for one model."""

    def __init__(self, spec: ModelSpec, limits: Limits | None = None,
                 fetch_iq_ref: IqRefFetcher | None = None,
                 bands_hz: tuple[tuple[float, float], ...] | None = None) -> None:
        self.spec = spec
        self.limits = limits or Limits()
        self.fetch_iq_ref = fetch_iq_ref
        #: the centre frequencies accepted: the model's bands, or (a worker serving a model per band) all of theirs
        self.bands_hz = tuple(sorted(bands_hz if bands_hz is not None else spec.bands_hz))
        self._known = set(spec.network.ids)

    # -- entry point ------------------------------------------------------------------------
    def decode(self, raw: bytes | bytearray | memoryview | dict[str, Any], *, digest: bool = True) -> DecodedPayload:
        """Validate and decode; raises PayloadError (or TransientError from an iq_ref fetch).

        ``digest=False`` skips hashing the IQ (the cache key), for paths that never use the cache.
        """
        # Only what the producer can fix is a PayloadError. Anything else raised here (a bug of ours, a soft
        # time limit) is a server fault and propagates as itself: never recorded as the producer's mistake.
        try:
            return self._decode(raw, digest)
        except MemoryError as exc:
            raise PayloadError(C.PAYLOAD_TOO_LARGE, "payload too large to decode") from exc

    def _decode(self, raw: bytes | bytearray | memoryview | dict[str, Any], digest: bool = True) -> DecodedPayload:
        doc = self._parse(raw)
        extra = _metadata_bytes(doc, stop_after=self.limits.max_metadata_bytes)
        if extra > self.limits.max_metadata_bytes:
            raise PayloadError(C.PAYLOAD_TOO_LARGE, f"more than {self.limits.max_metadata_bytes} bytes besides the IQ "
                               "data (ids, options, unknown fields)", max_bytes=self.limits.max_metadata_bytes)
        schema = doc.get("schema")
        if schema is None:
            raise PayloadError(C.MISSING_FIELD, "the payload has no schema", "schema")
        if schema != SCHEMA_IQ:
            raise PayloadError(C.UNKNOWN_SCHEMA, f"schema must be {SCHEMA_IQ!r}", "schema", got=str(schema)[:64])
        captured_at = self._captured_at(doc, self.limits.max_clock_skew_s)
        center = self._number(doc, "center_freq_hz")
        if not any(lo <= center <= hi for lo, hi in self.bands_hz):
            raise PayloadError(C.UNSUPPORTED_FREQUENCY,
                               f"centre frequency {center:.0f} Hz is outside the bands served here "
                               f"{[list(b) for b in self.bands_hz]}", "center_freq_hz")
        rate = self._number(doc, "sample_rate_hz")
        up, down = self._resample_ratio(rate)
        request_id = self._optional_id(doc, "request_id")
        session_id = self._optional_id(doc, "session_id")
        options = self._options(doc)
        need = math.ceil(self.spec.snippet_samples * down / up)
        # the digest is the cache key, and what tells a resubmission from a conflicting reuse of a request id
        ids, arrays, key, size = self._receivers(doc, need, digest or request_id is not None)
        iq = np.empty((len(ids), self.spec.snippet_samples), np.complex64)
        for i, x in enumerate(arrays):
            if up != 1 or down != 1:
                x = scipy.signal.resample_poly(x[:need + 64 * down], up, down).astype(np.complex64)
            iq[i] = x[: self.spec.snippet_samples]
        return DecodedPayload(captured_at=captured_at, center_freq_hz=center, sample_rate_hz=rate,
                              receiver_ids=tuple(ids), iq=iq, request_id=request_id, session_id=session_id,
                              options=options, digest=key, size_bytes=size)

    # -- pieces ------------------------------------------------------------------------------
    def _parse(self, raw: bytes | bytearray | memoryview | dict[str, Any]) -> dict[str, Any]:
        if isinstance(raw, dict):
            return raw
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise PayloadError(C.DECODE_ERROR, f"payload must be bytes or an object, not {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) > self.limits.max_payload_bytes:
            raise PayloadError(C.PAYLOAD_TOO_LARGE, f"payload is {len(raw)} bytes; the cap is "
                               f"{self.limits.max_payload_bytes}", size_bytes=len(raw),
                               max_bytes=self.limits.max_payload_bytes)
        try:
            doc = loads_raw(raw, self.limits.max_payload_bytes)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:  # json, msgpack (ExtraData etc. subclass ValueError)
            raise PayloadError(C.DECODE_ERROR, f"not a JSON or msgpack document: {exc}"[:300]) from exc
        except Exception as exc:  # msgpack's FormatError/StackError are not ValueErrors
            raise PayloadError(C.DECODE_ERROR, f"not a JSON or msgpack document: {type(exc).__name__}") from exc
        if not isinstance(doc, dict):
            raise PayloadError(C.DECODE_ERROR, f"payload must be an object, not {type(doc).__name__}")
        return doc

    @staticmethod
    def _number(doc: dict[str, Any], key: str) -> float:
        if key not in doc:
            raise PayloadError(C.MISSING_FIELD, f"{key} is required", key)
        v = doc[key]
        if not _is_number(v) or not math.isfinite(v) or v <= 0:
            raise PayloadError(C.INVALID_FIELD, f"{key} must be a positive finite number", key)
        return float(v)

    @staticmethod
    def _captured_at(doc: dict[str, Any], max_skew_s: float) -> str:
        if "captured_at" not in doc:
            raise PayloadError(C.MISSING_FIELD, "captured_at is required", "captured_at")
        v = doc["captured_at"]
        try:
            if not isinstance(v, str) or len(v) > 64:
                raise ValueError
            ts = datetime.fromisoformat(v)
        except ValueError as exc:
            raise PayloadError(C.INVALID_FIELD, "captured_at must be an ISO 8601 timestamp",
                               "captured_at") from exc
        if ts.tzinfo is None:
            raise PayloadError(C.INVALID_FIELD, "captured_at needs a time zone (e.g. 'Z')", "captured_at")
        latest = datetime.now(timezone.utc) + timedelta(seconds=max_skew_s)
        if not _EARLIEST_CAPTURE <= ts <= latest:
            raise PayloadError(C.INVALID_FIELD, f"captured_at must be from {_EARLIEST_CAPTURE.date()} on and at most "
                               f"{max_skew_s:g} s ahead of the worker's clock", "captured_at")
        return ts.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    @staticmethod
    def _optional_id(doc: dict[str, Any], key: str) -> str | None:
        v = doc.get(key)
        if v is None:
            return None
        if not is_valid_id(v):
            raise PayloadError(C.INVALID_FIELD, f"{key} must be a printable string of 1-{_MAX_ID_CHARS} characters", key)
        return v

    @staticmethod
    def _options(doc: dict[str, Any]) -> PayloadOptions:
        v = doc.get("options")
        if v is None:
            return PayloadOptions()
        if not isinstance(v, dict):
            raise PayloadError(C.INVALID_FIELD, "options must be an object", "options")
        cache = v.get("cache", True)
        if not isinstance(cache, bool):
            raise PayloadError(C.INVALID_FIELD, "options.cache must be true or false", "options.cache")
        model = v.get("model")
        if model is not None and (not isinstance(model, str) or not 0 < len(model) <= _MAX_ID_CHARS):
            raise PayloadError(C.INVALID_FIELD, "options.model must be a model alias or version", "options.model")
        return PayloadOptions(cache=cache, model=model)

    def _resample_ratio(self, rate: float) -> tuple[int, int]:
        target = self.spec.sample_rate_hz
        most = self.spec.max_resample_ratio
        # outside [target / most, target * most] no ratio can work; checked first, so that an extreme
        # rate (a subnormal one makes target / rate infinite) never reaches Fraction
        ratio = Fraction(target / rate).limit_denominator(most) if target / most * 0.999 <= rate <= target * most * 1.001 \
            else Fraction(0)
        ok = (0 < ratio.numerator <= most and ratio.denominator <= most
              and abs(float(ratio) * rate - target) <= 1e-6 * target)
        if not ok:
            raise PayloadError(C.UNSUPPORTED_SAMPLE_RATE,
                               f"sample rate {rate:g} Hz cannot be resampled to the model's {target:g} Hz "
                               f"by a ratio up/down with both at most {self.spec.max_resample_ratio}",
                               "sample_rate_hz")
        return ratio.numerator, ratio.denominator

    def _receivers(self, doc: dict[str, Any], need: int, digest: bool = True) -> tuple[list[str], list[IQ], str, int]:
        recs = doc.get("receivers")
        if recs is None:
            raise PayloadError(C.MISSING_FIELD, "receivers is required", "receivers")
        if not isinstance(recs, list):
            raise PayloadError(C.INVALID_FIELD, "receivers must be a list", "receivers")
        if len(recs) > len(self.spec.network):
            raise PayloadError(C.TOO_MANY_RECEIVERS, f"{len(recs)} receivers; the network has "
                               f"{len(self.spec.network)}", "receivers", count=len(recs))
        if len(recs) < self.spec.min_receivers:
            raise PayloadError(C.TOO_FEW_RECEIVERS, f"{len(recs)} receivers; at least "
                               f"{self.spec.min_receivers} are needed", "receivers", count=len(recs))
        ids: list[str] = []
        for i, rec in enumerate(recs):
            where = f"receivers[{i}]"
            if not isinstance(rec, dict):
                raise PayloadError(C.INVALID_FIELD, "a receiver must be an object", where)
            rid = rec.get("id")
            if not isinstance(rid, str):
                raise PayloadError(C.MISSING_FIELD if rid is None else C.INVALID_FIELD,
                                   "a receiver needs a string id", f"{where}.id")
            if rid not in self._known:
                raise PayloadError(C.UNKNOWN_RECEIVER, f"unknown receiver {rid[:64]!r}; the model knows "
                                   f"{sorted(self._known)}", f"{where}.id", receiver=rid[:64])
            if rid in ids:
                raise PayloadError(C.DUPLICATE_RECEIVER, f"receiver {rid!r} appears twice", f"{where}.id",
                                   receiver=rid)
            ids.append(rid)
        h = hashlib.blake2b(digest_size=16) if digest else _NoHash()
        h.update(repr((doc.get("sample_rate_hz"), len(ids))).encode())
        arrays: list[IQ] = []
        total = 0
        for i, rec in enumerate(recs):
            x, nbytes = self._receiver_iq(rec, f"receivers[{i}]", need, h)
            total += nbytes
            if total > self.limits.max_payload_bytes:
                raise PayloadError(C.PAYLOAD_TOO_LARGE, f"IQ data exceeds the cap of "
                                   f"{self.limits.max_payload_bytes} bytes", "receivers",
                                   max_bytes=self.limits.max_payload_bytes)
            arrays.append(x)
        return ids, arrays, h.hexdigest(), total

    def _receiver_iq(self, rec: dict[str, Any], where: str, need: int, h: "hashlib._Hash") -> tuple[IQ, int]:
        rid = rec["id"]
        gain = rec.get("gain_db", 0.0)
        if not _is_number(gain) or not math.isfinite(gain) or abs(gain) > 200:
            raise PayloadError(C.INVALID_FIELD, "gain_db must be a finite number of dB within +-200",
                               f"{where}.gain_db", receiver=rid)
        has_iq, has_ref = "iq" in rec, "iq_ref" in rec
        if has_iq == has_ref:
            raise PayloadError(C.MISSING_FIELD if not has_iq else C.INVALID_FIELD,
                               "a receiver needs exactly one of iq or iq_ref", where, receiver=rid)
        if has_ref:
            raw, dtype = self._fetch_ref(rec["iq_ref"], f"{where}.iq_ref", rid), "complex64"
            x = self._npy_iq(raw, f"{where}.iq_ref", rid)
            nbytes = len(raw)
        else:
            iq = rec["iq"]
            if not isinstance(iq, dict):
                raise PayloadError(C.INVALID_FIELD, "iq must be an object {dtype, data}", f"{where}.iq", receiver=rid)
            dtype = iq.get("dtype")
            if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or dict is not even hashable
                raise PayloadError(C.UNSUPPORTED_DTYPE, f"IQ dtype {str(dtype)[:32]!r} is not one of "
                                   f"{sorted(DTYPES)}", f"{where}.iq.dtype", receiver=rid)
            data = iq.get("data")
            width = DTYPES[dtype].itemsize * 2
            cap_bytes = self.limits.max_samples_per_receiver * width
            if isinstance(data, str):
                if len(data) > cap_bytes * 4 // 3 + 4:
                    raise PayloadError(C.WRONG_LENGTH, f"more than {self.limits.max_samples_per_receiver} "
                                       "samples", f"{where}.iq.data", receiver=rid)
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise PayloadError(C.BAD_BASE64, "iq.data is not valid base64", f"{where}.iq.data",
                                       receiver=rid) from exc
            elif not isinstance(data, (bytes, bytearray, memoryview)):
                raise PayloadError(C.MISSING_FIELD if data is None else C.INVALID_FIELD,
                                   "iq.data must be base64 text (JSON) or bytes (msgpack)", f"{where}.iq.data",
                                   receiver=rid)
            data = bytes(data)
            if len(data) % width:
                raise PayloadError(C.WRONG_LENGTH, f"{len(data)} bytes is not a whole number of {width}-byte "
                                   f"{dtype} samples", f"{where}.iq.data", receiver=rid)
            if len(data) > cap_bytes:
                raise PayloadError(C.WRONG_LENGTH, f"more than {self.limits.max_samples_per_receiver} samples",
                                   f"{where}.iq.data", receiver=rid)
            x = iq_from_bytes(data, dtype, float(gain))
            nbytes = len(data)
            h.update(rid.encode())
            h.update(dtype.encode())
            h.update(repr(float(gain)).encode())
            h.update(data)
        if has_ref:
            x = x * np.float32(10.0 ** (-float(gain) / 20.0))
            h.update(rid.encode())
            h.update(repr(float(gain)).encode())
            h.update(x.tobytes())
        if x.shape[0] < need:
            raise PayloadError(C.WRONG_LENGTH, f"{x.shape[0]} samples; the model needs at least {need} at "
                               "this sample rate", f"{where}.iq", receiver=rid, samples=int(x.shape[0]),
                               needed=need)
        # one pass answers both checks: the largest |I| or |Q| is NaN or Inf exactly when a sample is
        peak = float(np.abs(x.view(np.float32)).max()) if x.size else 0.0
        if not math.isfinite(peak):
            raise PayloadError(C.NON_FINITE, "IQ contains NaN or Inf", f"{where}.iq", receiver=rid)
        if peak > self.limits.max_sample_magnitude:
            raise PayloadError(C.OUT_OF_RANGE, f"samples reach {peak:.3g} x full scale once gain_db is removed; "
                               f"no receiver hears more than {self.limits.max_sample_magnitude:g} x full scale "
                               "(check the dtype's scaling and gain_db)", f"{where}.iq", receiver=rid)
        return x, nbytes

    def _fetch_ref(self, ref: Any, where: str, rid: str) -> bytes:
        if not isinstance(ref, str) or len(ref) > 1024 or not _S3_URL.match(ref):
            raise PayloadError(C.INVALID_FIELD, "iq_ref must be an s3://bucket/key URL (a valid bucket name "
                               "and a key)", where, receiver=rid)
        if self.fetch_iq_ref is None:
            raise PayloadError(C.IQ_REF_UNAVAILABLE, "this worker has no object store configured for iq_ref",
                               where, receiver=rid)
        raw = self.fetch_iq_ref(ref)  # raises PayloadError (missing object) or TransientError (store down)
        if len(raw) > self.limits.max_payload_bytes:
            raise PayloadError(C.PAYLOAD_TOO_LARGE, "iq_ref object exceeds the payload cap", where, receiver=rid)
        return raw

    def _npy_iq(self, raw: bytes, where: str, rid: str) -> IQ:
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise PayloadError(C.DECODE_ERROR, f"iq_ref object is not a .npy array: {exc}"[:200], where,
                               receiver=rid) from exc
        if arr.ndim == 2 and arr.shape[1] == 2 and arr.dtype.kind == "f":
            arr = arr[:, 0] + 1j * arr[:, 1]
        if arr.ndim != 1 or arr.dtype.kind != "c":
            raise PayloadError(C.UNSUPPORTED_DTYPE, "iq_ref .npy must hold a 1-D complex array (or float [N, 2] "
                               "I/Q) in full-scale units",
                               where, receiver=rid, shape=list(arr.shape), dtype=str(arr.dtype))
        if arr.shape[0] > self.limits.max_samples_per_receiver:
            raise PayloadError(C.WRONG_LENGTH, f"more than {self.limits.max_samples_per_receiver} samples", where,
                               receiver=rid)
        return np.ascontiguousarray(arr, np.complex64)
