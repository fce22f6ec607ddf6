"""Decode and validate ``heimdall.iq/v1`` payloads (the payload contract in docs/architecture.md).

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
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import blake3
import numpy as np
import scipy.signal

from .codec import CI16_FULL_SCALE, DTYPES, SCHEMA_IQ, iq_from_bytes, loads_raw
from ..errors import PayloadCode as C
from ..errors import PayloadError, TransientError
from .quality import mean_power
from .spec import ModelSpec
from .types import IQ

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
    digest: str = ""  #: ``b3:`` + BLAKE3 of receiver ids, encodings and IQ bytes (the cache key's payload part)
    size_bytes: int = 0  #: IQ bytes on the wire
    mean_power: np.ndarray | None = None  #: [receivers] mean |x|^2 of ``iq`` (the quality flag's), measured at decode


def _peak(parts: np.ndarray, scale: np.float32, limit: float) -> float:
    """The largest |I| or |Q| of wire components ``parts`` once multiplied by ``scale``, in float32 as the decoded
    samples hold it (NaN or Inf when a sample is). int16 components can neither be NaN nor exceed 32768, so when
    32768 x ``scale`` is within ``limit`` their peak needs no pass over them."""
    if not parts.size:
        return 0.0
    if parts.dtype.kind == "i":  # 32768 x scale stays far inside float32 (|gain_db| <= 200)
        if float(np.float32(CI16_FULL_SCALE) * scale) <= limit:
            return 0.0
        most = max(-int(parts.min()), int(parts.max()))
        return float(np.float32(most) * scale)
    peak = np.abs(parts).max()
    if scale == 1:
        return float(peak)
    with np.errstate(over="ignore", invalid="ignore"):  # a finite sample times a gain above 1 may overflow: Inf
        return float(peak * scale)


class _Digest:
    """The payload digest: BLAKE3 (7 GB/s on one core here, against 1 GB/s for hashlib's BLAKE2b), 128 bits, named
    ``b3:`` so that stores tell it from the BLAKE2b digests of earlier versions (``store.other_payload``)."""

    def __init__(self) -> None:
        self._h = blake3.blake3()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return "b3:" + self._h.hexdigest(length=16)


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
    strings and bytes by length, keys too, 8 per other scalar. Stops once past ``stop_after``.

    The contract's own shape (a top-level object, ``receivers`` a list of objects, each ``iq`` an object) is
    walked directly; anything else, and every value below it, by :func:`_tree_bytes`."""
    total = 0
    for k, v in doc.items():
        total += len(k) if isinstance(k, str) else 8
        if k == "receivers" and isinstance(v, list):
            total += 8 * len(v)
            for rec in v:
                if not isinstance(rec, dict):
                    total += _tree_bytes(rec, stop_after - total)
                else:
                    for rk, rv in rec.items():
                        total += len(rk) if isinstance(rk, str) else 8
                        if rk == "iq" and isinstance(rv, dict):
                            for ik, iv in rv.items():
                                total += len(ik) if isinstance(ik, str) else 8
                                if ik != "data":
                                    total += len(iv) if isinstance(iv, str) else _tree_bytes(iv, stop_after - total)
                        elif isinstance(rv, str):
                            total += len(rv)
                        elif isinstance(rv, (int, float)):
                            total += 8
                        else:
                            total += _tree_bytes(rv, stop_after - total)
                if total > stop_after:
                    return total
        else:
            total += _tree_bytes(v, stop_after - total)
        if total > stop_after:
            return total
    return total


def _tree_bytes(obj: Any, stop_after: int) -> int:
    """The bytes of any value, counted like :func:`_metadata_bytes` counts (iteratively; stops once past
    ``stop_after``)."""
    if isinstance(obj, (str, bytes, bytearray, memoryview)):
        return len(obj)
    if not isinstance(obj, (dict, list)):
        return 8
    total = 0
    stack: list[Any] = [obj]
    while stack and total <= stop_after:
        o = stack.pop()
        if isinstance(o, dict):
            for k, v in o.items():
                total += len(k) if isinstance(k, str) else 8
                stack.append(v)
        elif isinstance(o, list):
            total += 8 * len(o)
            stack.extend(o)
        elif isinstance(o, (str, bytes, bytearray, memoryview)):
            total += len(o)
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
        self._ratios: dict[float, tuple[int, int]] = {}

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
        ids, iq, key, size = self._receivers(doc, need, digest or request_id is not None, (up, down))
        return DecodedPayload(captured_at=captured_at, center_freq_hz=center, sample_rate_hz=rate,
                              receiver_ids=tuple(ids), iq=iq, request_id=request_id, session_id=session_id,
                              options=options, digest=key, size_bytes=size, mean_power=mean_power(iq))

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
        """(up, down) that bring ``rate`` to the model's; PayloadError when no ratio can. Remembered per rate (a
        network sends a handful of rates; the Fraction search costs more than the rest of a payload's fields)."""
        known = self._ratios.get(rate)
        if known is not None:
            return known
        ratio = self._find_ratio(rate)
        if len(self._ratios) < 64:
            self._ratios[rate] = ratio
        return ratio

    def _find_ratio(self, rate: float) -> tuple[int, int]:
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

    def _receivers(self, doc: dict[str, Any], need: int, digest: bool = True,
                   ratio: tuple[int, int] = (1, 1)) -> tuple[list[str], IQ, str, int]:
        """(ids, IQ [receivers, snippet_samples] at the model's rate, digest, IQ bytes on the wire). At the model's
        own rate each receiver's samples are converted straight into their row of the output, in one pass."""
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
        h = _Digest() if digest else _NoHash()
        h.update(repr((doc.get("sample_rate_hz"), len(ids))).encode())
        n = self.spec.snippet_samples
        up, down = ratio
        direct = up == 1 and down == 1
        iq = np.empty((len(ids), n), np.complex64)
        total = 0
        for i, rec in enumerate(recs):
            x, nbytes = self._receiver_iq(rec, f"receivers[{i}]", need, h, iq[i] if direct else None)
            total += nbytes
            if total > self.limits.max_payload_bytes:
                raise PayloadError(C.PAYLOAD_TOO_LARGE, f"IQ data exceeds the cap of "
                                   f"{self.limits.max_payload_bytes} bytes", "receivers",
                                   max_bytes=self.limits.max_payload_bytes)
            if x is not None:  # another rate: resampled, then cut to the snippet
                iq[i] = scipy.signal.resample_poly(x[:need + 64 * down], up, down).astype(np.complex64)[:n]
        return ids, iq, h.hexdigest(), total

    def _receiver_iq(self, rec: dict[str, Any], where: str, need: int, h: "_Digest | _NoHash",
                     out: IQ | None = None) -> tuple[IQ | None, int]:
        """Validate one receiver and return (its IQ, its wire bytes); with ``out`` (a row at the model's rate) its
        first samples are written there instead, and None is returned for the IQ."""
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
            raw = self._fetch_ref(rec["iq_ref"], f"{where}.iq_ref", rid)
            x = self._npy_iq(raw, f"{where}.iq_ref", rid) * np.float32(10.0 ** (-float(gain) / 20.0))
            h.update(f"{rid}\0ref\0{float(gain)!r}\0".encode())
            h.update(x.tobytes())
            self._check_samples(x.shape[0], need, where, rid)
            self._check_peak(float(np.abs(x.view(np.float32)).max()) if x.size else 0.0, where, rid)
            if out is not None:
                out[:] = x[:out.shape[0]]
                return None, len(raw)
            return x, len(raw)
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
        if not isinstance(data, bytes):
            data = bytes(data)
        if len(data) % width:
            raise PayloadError(C.WRONG_LENGTH, f"{len(data)} bytes is not a whole number of {width}-byte "
                               f"{dtype} samples", f"{where}.iq.data", receiver=rid)
        if len(data) > cap_bytes:
            raise PayloadError(C.WRONG_LENGTH, f"more than {self.limits.max_samples_per_receiver} samples",
                               f"{where}.iq.data", receiver=rid)
        h.update(f"{rid}\0{dtype}\0{float(gain)!r}\0".encode())
        h.update(data)
        self._check_samples(len(data) // width, need, where, rid)
        # the samples as numbers, without a copy; the gain and the full scale in one float32 factor (as
        # codec.iq_from_components applies them)
        parts = np.frombuffer(data, dtype=DTYPES[dtype])
        scale = np.float32(10.0 ** (-float(gain) / 20.0) / (CI16_FULL_SCALE if dtype == "ci16" else 1.0))
        if out is None:
            self._check_peak(_peak(parts, scale, self.limits.max_sample_magnitude), where, rid)
            return iq_from_bytes(data, dtype, float(gain)), len(data)
        # straight into the output row (one pass over the samples, just read by the hash), then the peak of what was
        # written and of any samples past the snippet: the decoded values' own largest |I| or |Q|
        flat = out.view(np.float32)
        head = parts[:flat.shape[0]]
        if scale == 1:
            flat[:] = head
        elif scale < 1 or parts.dtype.kind == "i":  # int16 x scale stays far inside float32 (|gain_db| <= 200)
            np.multiply(head, scale, out=flat)
        else:
            with np.errstate(over="ignore"):  # a finite float times a gain above 1 may overflow: Inf, refused below
                np.multiply(head, scale, out=flat)
        if parts.dtype.kind == "i" and float(np.float32(CI16_FULL_SCALE) * scale) <= self.limits.max_sample_magnitude:
            return None, len(data)  # int16 samples: never NaN, never past 32768 x scale
        peak = float(np.abs(flat).max())  # NaN when a sample is NaN
        if parts.size > head.size:
            tail = _peak(parts[head.size:], scale, self.limits.max_sample_magnitude)
            peak = max(peak, tail) if math.isfinite(peak) and math.isfinite(tail) else math.nan
        self._check_peak(peak, where, rid)
        return None, len(data)

    @staticmethod
    def _check_samples(samples: int, need: int, where: str, rid: str) -> None:
        if samples < need:
            raise PayloadError(C.WRONG_LENGTH, f"{samples} samples; the model needs at least {need} at "
                               "this sample rate", f"{where}.iq", receiver=rid, samples=int(samples), needed=need)

    def _check_peak(self, peak: float, where: str, rid: str) -> None:
        """The largest |I| or |Q| is NaN or Inf exactly when a sample is; beyond the limit, out of range."""
        if not math.isfinite(peak):
            raise PayloadError(C.NON_FINITE, "IQ contains NaN or Inf", f"{where}.iq", receiver=rid)
        if peak > self.limits.max_sample_magnitude:
            raise PayloadError(C.OUT_OF_RANGE, f"samples reach {peak:.3g} x full scale once gain_db is removed; "
                               f"no receiver hears more than {self.limits.max_sample_magnitude:g} x full scale "
                               "(check the dtype's scaling and gain_db)", f"{where}.iq", receiver=rid)

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
