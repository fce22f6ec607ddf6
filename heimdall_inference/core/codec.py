"""Wire formats of ``heimdall.iq/v1``: JSON (base64 arrays) and msgpack (raw bytes), never pickle.

The IQ encodings are shared by the producer side (simulator, CLI) and the decoder, so that the
training data goes through exactly the quantisation and gain removal a payload does:

* ``ci16``: little-endian interleaved int16 I, Q; full scale 32768.
* ``complex64``: little-endian interleaved float32 I, Q.

A receiver's optional ``gain_db`` is the known digital gain applied before digitising; decoding
divides it out, so decoded IQ is in full-scale units referred to the antenna.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import msgpack
import numpy as np

from .types import IQ

__all__ = ["SCHEMA_IQ", "DTYPES", "iq_components", "iq_from_components", "iq_to_bytes", "iq_from_bytes", "encode_receiver", "dumps", "loads_raw",
           "detect_format"]

SCHEMA_IQ = "heimdall.iq/v1"
CI16_FULL_SCALE = 32768.0
DTYPES = {"ci16": np.dtype("<i2"), "complex64": np.dtype("<f4")}
"""Wire dtype -> numpy dtype of one real component; a sample is two of them (I, Q)."""


def iq_components(iq: IQ, dtype: str, gain_db: float | np.ndarray = 0.0) -> np.ndarray:
    """Full-scale complex IQ [..., samples] -> wire components [..., samples, 2] after ``gain_db``.

    ``ci16`` is quantised (rounded, clipped) to int16 at full scale 32768; ``complex64`` is float32.
    """
    g = (10.0 ** (np.asarray(gain_db, float) / 20.0))[..., None, None]
    inter = np.stack([iq.real, iq.imag], axis=-1).astype(np.float64) * g
    if dtype == "ci16":
        return np.clip(np.rint(inter * CI16_FULL_SCALE), -32768, 32767).astype("<i2")
    if dtype == "complex64":
        return inter.astype("<f4")
    raise ValueError(f"unknown IQ dtype {dtype!r}")


def iq_from_components(pairs: np.ndarray, dtype: str, gain_db: float | np.ndarray = 0.0) -> IQ:
    """Wire components [..., samples, 2] -> full-scale complex64 [..., samples] with the gain removed."""
    scale = 10.0 ** (-np.asarray(gain_db, float) / 20.0) / (CI16_FULL_SCALE if dtype == "ci16" else 1.0)
    scale = np.asarray(scale, np.float32)[..., None]
    out = np.empty(pairs.shape[:-1], np.complex64)
    out.real = pairs[..., 0] * scale
    out.imag = pairs[..., 1] * scale
    return out


def iq_to_bytes(iq: IQ, dtype: str, gain_db: float = 0.0) -> bytes:
    """One receiver's full-scale IQ -> little-endian wire bytes."""
    return iq_components(iq, dtype, gain_db).tobytes()


def iq_from_bytes(raw: bytes | memoryview, dtype: str, gain_db: float = 0.0) -> IQ:
    """Little-endian wire bytes -> full-scale complex64 with the gain removed.

    Raises ValueError when the byte count is not a whole number of samples.
    """
    width = DTYPES[dtype].itemsize * 2
    if len(raw) % width:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {width}-byte samples")
    pairs = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(-1, 2)
    return iq_from_components(pairs, dtype, gain_db)


def encode_receiver(receiver_id: str, iq: IQ, dtype: str, *, gain_db: float = 0.0,
                    binary: bool = False) -> dict[str, Any]:
    """One ``receivers[]`` entry; ``binary`` keeps raw bytes (msgpack) instead of base64 (JSON)."""
    data = iq_to_bytes(iq, dtype, gain_db)
    entry: dict[str, Any] = {"id": receiver_id,
                             "iq": {"dtype": dtype, "data": data if binary else base64.b64encode(data).decode()}}
    if gain_db:
        entry["gain_db"] = float(gain_db)
    return entry


def detect_format(raw: bytes) -> str:
    """"json" when the bytes start (after whitespace) with ``{``, else "msgpack"."""
    head = raw[:64].lstrip()
    return "json" if head[:1] == b"{" else "msgpack"


def dumps(payload: dict[str, Any], fmt: str) -> bytes:
    """Serialise a payload dict as ``json`` or ``msgpack`` bytes (msgpack keeps bytes as bin)."""
    if fmt == "json":
        return json.dumps(payload, separators=(",", ":")).encode()
    if fmt == "msgpack":
        return msgpack.packb(payload, use_bin_type=True)
    raise ValueError(f"unknown format {fmt!r}")


def loads_raw(raw: bytes, max_bytes: int) -> Any:
    """Parse JSON or msgpack bytes with msgpack's size limits bounded by ``max_bytes``.

    Raises ValueError (or msgpack/JSON's own subclasses of it) on malformed input; the payload
    module translates them into :class:`~heimdall_inference.errors.PayloadError`.
    """
    if detect_format(raw) == "json":
        return json.loads(raw)
    return msgpack.unpackb(raw, raw=False, strict_map_key=True,
                           max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=65536,
                           max_map_len=4096, max_ext_len=0)
