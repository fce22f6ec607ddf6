"""Wire encodings round-trip and never involve pickle."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.core.codec import (
    detect_format,
    dumps,
    encode_receiver,
    iq_from_bytes,
    iq_to_bytes,
    loads_raw,
)


@pytest.fixture()
def iq() -> np.ndarray:
    rng = np.random.default_rng(0)
    return ((rng.standard_normal(500) + 1j * rng.standard_normal(500)) * 0.05).astype(np.complex64)


def test_complex64_round_trip_is_exact(iq):
    np.testing.assert_array_equal(iq_from_bytes(iq_to_bytes(iq, "complex64"), "complex64"), iq)


def test_ci16_round_trip_within_one_lsb_and_gain_removed(iq):
    raw = iq_to_bytes(iq, "ci16", gain_db=12.0)
    assert len(raw) == 4 * len(iq)
    back = iq_from_bytes(raw, "ci16", gain_db=12.0)
    lsb = 10 ** (-12 / 20) / 32768
    assert np.max(np.abs(back - iq)) <= lsb


def test_ci16_clips_at_full_scale():
    raw = iq_to_bytes(np.array([2.0 + 2.0j], np.complex64), "ci16")
    assert np.frombuffer(raw, "<i2").tolist() == [32767, 32767]


def test_partial_sample_rejected():
    with pytest.raises(ValueError):
        iq_from_bytes(b"\x00" * 6, "ci16")
    with pytest.raises(ValueError):
        iq_to_bytes(np.zeros(2, np.complex64), "cu8")


def test_formats(iq):
    doc = {"receivers": [encode_receiver("torino", iq, "ci16", gain_db=3.0, binary=True)]}
    packed = dumps(doc, "msgpack")
    assert detect_format(packed) == "msgpack"
    back = loads_raw(packed, 1 << 20)
    assert isinstance(back["receivers"][0]["iq"]["data"], bytes)
    assert back["receivers"][0]["gain_db"] == 3.0
    text = dumps({"a": 1}, "json")
    assert detect_format(b"  \n" + text) == "json"
    assert loads_raw(text, 100) == {"a": 1}
    with pytest.raises(ValueError):
        dumps(doc, "pickle")
