"""Payload decode and validation: every rule of the payload contract, and properties over malformed input."""

from __future__ import annotations

import base64
import copy
import io
import json

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_inference.core.codec import dumps, iq_from_bytes
from heimdall_inference.errors import PayloadCode as C
from heimdall_inference.errors import PayloadError
from heimdall_inference.core.payload import Limits, PayloadDecoder


@pytest.fixture(scope="module")
def decoder(spec) -> PayloadDecoder:
    return PayloadDecoder(spec)


class _Sample:
    """A valid payload behind a short repr (hypothesis prints its test's arguments)."""

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        self.raw = dumps(doc, "json")

    def copy(self) -> dict:
        return copy.deepcopy(self.doc)

    def __repr__(self) -> str:
        return f"<payload {self.doc.get('request_id')}>"


@pytest.fixture(scope="module")
def sample(scenes_and_payloads) -> _Sample:
    return _Sample(scenes_and_payloads[1][0])


def _code(decoder: PayloadDecoder, raw) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decoder.decode(raw)
    err = info.value
    doc = err.to_dict()
    json.dumps(doc)  # the structured error result is JSON-serialisable
    assert set(doc) >= {"code", "message", "field"}
    return err


def test_valid_json_and_msgpack_decode_to_the_same_iq(decoder, payload):
    from_json = decoder.decode(dumps(payload, "json"))
    binary = copy.deepcopy(payload)
    for rec in binary["receivers"]:
        rec["iq"]["data"] = base64.b64decode(rec["iq"]["data"])
    from_msgpack = decoder.decode(dumps(binary, "msgpack"))
    assert from_json.receiver_ids == from_msgpack.receiver_ids
    np.testing.assert_array_equal(from_json.iq, from_msgpack.iq)
    assert from_json.iq.shape == (len(payload["receivers"]), decoder.spec.snippet_samples)
    assert from_json.iq.dtype == np.complex64
    assert from_json.digest == from_msgpack.digest and from_json.digest.startswith("b3:") and len(from_json.digest) == 35
    assert from_json.captured_at == "2026-11-23T07:00:00.000Z"
    assert from_json.request_id == payload["request_id"]


def test_gain_db_is_removed(decoder, payload):
    rec = payload["receivers"][0]
    raw = base64.b64decode(rec["iq"]["data"])
    plain = iq_from_bytes(raw, rec["iq"]["dtype"], 0.0)
    rec["gain_db"] = 20.0
    decoded = decoder.decode(payload)
    np.testing.assert_allclose(decoded.iq[0], plain[: decoder.spec.snippet_samples] / 10.0, rtol=1e-6)


def test_digest_changes_with_receiver_data_and_ids(decoder, payload):
    a = decoder.decode(payload).digest
    other = copy.deepcopy(payload)
    other["receivers"] = other["receivers"][::-1]
    b = decoder.decode(other).digest
    assert a != b


def test_timestamp_normalised_to_utc(decoder, payload):
    payload["captured_at"] = "2026-11-23T09:00:00.5+02:00"
    assert decoder.decode(payload).captured_at == "2026-11-23T07:00:00.500Z"


def test_longer_snippet_keeps_first_samples(decoder, payload):
    rec = payload["receivers"][0]
    raw = base64.b64decode(rec["iq"]["data"])
    rec["iq"]["data"] = base64.b64encode(raw + raw).decode()
    decoded = decoder.decode(payload)
    assert decoded.iq.shape[1] == decoder.spec.snippet_samples


def test_resampled_payload_matches_model_rate(spec, decoder):
    from heimdall_inference.lab.simulator import SignalConfig, scene_payloads, simulate

    sig = SignalConfig(sample_rate_hz=24_000.0)
    scenes, iq = simulate(spec.network, 1, seed=5, signal=sig, n_online=4)
    doc = scene_payloads(scenes, iq, spec.network, sig, seed=5, dtype="complex64")[0]
    decoded = decoder.decode(doc)
    assert decoded.sample_rate_hz == 24_000.0
    assert decoded.iq.shape == (4, spec.snippet_samples)
    # the power inside the model's band survives the anti-aliasing filter (noise outside does not)
    p_in = np.mean(np.abs(iq[0, scenes.online[0]]) ** 2, axis=1)
    p_out = np.mean(np.abs(decoded.iq) ** 2, axis=1)
    strong = 10 * np.log10(p_in) > -100
    assert np.all(np.abs(10 * np.log10(p_out[strong] / p_in[strong])) < 1.0)


# -- every invalid-input code ---------------------------------------------------------------------

def _b64(n_bytes: int) -> str:
    return base64.b64encode(b"\x00" * n_bytes).decode()


def _days_ahead(days: float) -> str:
    from datetime import datetime, timedelta, timezone

    return (datetime.now(timezone.utc) + timedelta(days=days)).isoformat()


CASES = [
    ("decode_error: not json", lambda p: b"{not json", C.DECODE_ERROR, None),
    ("decode_error: garbage msgpack", lambda p: b"\xc1\xc1\xc1", C.DECODE_ERROR, None),
    ("decode_error: a list", lambda p: b"[1, 2]", C.DECODE_ERROR, None),
    ("decode_error: not bytes", lambda p: 42, C.DECODE_ERROR, None),
    ("payload_too_large", lambda p: b" " * (9 * 1024 * 1024), C.PAYLOAD_TOO_LARGE, None),
    ("missing schema", lambda p: {k: v for k, v in p.items() if k != "schema"}, C.MISSING_FIELD, "schema"),
    ("unknown schema", lambda p: {**p, "schema": "heimdall.iq/v0"}, C.UNKNOWN_SCHEMA, "schema"),
    ("missing captured_at", lambda p: {k: v for k, v in p.items() if k != "captured_at"}, C.MISSING_FIELD, "captured_at"),
    ("bad captured_at", lambda p: {**p, "captured_at": "yesterday"}, C.INVALID_FIELD, "captured_at"),
    ("naive captured_at", lambda p: {**p, "captured_at": "2026-11-23T07:00:00"}, C.INVALID_FIELD, "captured_at"),
    ("captured in year 1 (an idempotency key, a hypertable chunk)", lambda p: {**p, "captured_at": "0001-01-01T00:00:00Z"},
     C.INVALID_FIELD, "captured_at"),
    ("captured in 9999", lambda p: {**p, "captured_at": "9999-12-31T23:59:59Z"}, C.INVALID_FIELD, "captured_at"),
    ("captured two days ahead of the clock", lambda p: {**p, "captured_at": _days_ahead(2)}, C.INVALID_FIELD,
     "captured_at"),
    ("20 MB in an unknown field (it was stored)", lambda p: {**p, "note": "x" * 20_000_000}, C.PAYLOAD_TOO_LARGE, None),
    ("a big unknown field in a receiver", lambda p: _rx(p, 2, lambda r: r.update(comment="y" * 70_000)),
     C.PAYLOAD_TOO_LARGE, None),
    ("missing center", lambda p: {k: v for k, v in p.items() if k != "center_freq_hz"}, C.MISSING_FIELD, "center_freq_hz"),
    ("center is text", lambda p: {**p, "center_freq_hz": "145.5 MHz"}, C.INVALID_FIELD, "center_freq_hz"),
    ("center is bool", lambda p: {**p, "center_freq_hz": True}, C.INVALID_FIELD, "center_freq_hz"),
    ("center NaN", lambda p: {**p, "center_freq_hz": float("nan")}, C.INVALID_FIELD, "center_freq_hz"),
    ("70 cm band", lambda p: {**p, "center_freq_hz": 433.5e6}, C.UNSUPPORTED_FREQUENCY, "center_freq_hz"),
    ("negative rate", lambda p: {**p, "sample_rate_hz": -12000}, C.INVALID_FIELD, "sample_rate_hz"),
    ("odd rate", lambda p: {**p, "sample_rate_hz": 11025.0}, C.UNSUPPORTED_SAMPLE_RATE, "sample_rate_hz"),
    ("huge rate", lambda p: {**p, "sample_rate_hz": 2.4e6}, C.UNSUPPORTED_SAMPLE_RATE, "sample_rate_hz"),
    ("bad request_id", lambda p: {**p, "request_id": "x" * 500}, C.INVALID_FIELD, "request_id"),
    ("bad session_id", lambda p: {**p, "session_id": 7}, C.INVALID_FIELD, "session_id"),
    ("bad options", lambda p: {**p, "options": []}, C.INVALID_FIELD, "options"),
    ("bad options.cache", lambda p: {**p, "options": {"cache": "yes"}}, C.INVALID_FIELD, "options.cache"),
    ("bad options.model", lambda p: {**p, "options": {"model": ""}}, C.INVALID_FIELD, "options.model"),
    ("missing receivers", lambda p: {k: v for k, v in p.items() if k != "receivers"}, C.MISSING_FIELD, "receivers"),
    ("receivers not a list", lambda p: {**p, "receivers": {"id": "torino"}}, C.INVALID_FIELD, "receivers"),
    ("two receivers", lambda p: {**p, "receivers": p["receivers"][:2]}, C.TOO_FEW_RECEIVERS, "receivers"),
    ("eight receivers", lambda p: {**p, "receivers": p["receivers"] * 3}, C.TOO_MANY_RECEIVERS, "receivers"),
    ("receiver not an object", lambda p: {**p, "receivers": ["torino"] + p["receivers"][1:]}, C.INVALID_FIELD, "receivers[0]"),
    ("receiver without id", lambda p: _rx(p, 0, lambda r: r.pop("id")), C.MISSING_FIELD, "receivers[0].id"),
    ("unknown receiver", lambda p: _rx(p, 1, lambda r: r.update(id="roma")), C.UNKNOWN_RECEIVER, "receivers[1].id"),
    ("duplicate receiver", lambda p: _rx(p, 1, lambda r: r.update(id=p["receivers"][0]["id"])), C.DUPLICATE_RECEIVER,
     "receivers[1].id"),
    ("no iq", lambda p: _rx(p, 0, lambda r: r.pop("iq")), C.MISSING_FIELD, "receivers[0]"),
    ("iq and iq_ref", lambda p: _rx(p, 0, lambda r: r.update(iq_ref="s3://b/k.npy")), C.INVALID_FIELD, "receivers[0]"),
    ("iq not an object", lambda p: _rx(p, 0, lambda r: r.update(iq="AAAA")), C.INVALID_FIELD, "receivers[0].iq"),
    ("bad dtype", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype="cu8")), C.UNSUPPORTED_DTYPE, "receivers[0].iq.dtype"),
    ("no data", lambda p: _rx(p, 0, lambda r: r["iq"].pop("data")), C.MISSING_FIELD, "receivers[0].iq.data"),
    ("data is a number", lambda p: _rx(p, 0, lambda r: r["iq"].update(data=12)), C.INVALID_FIELD, "receivers[0].iq.data"),
    ("bad base64", lambda p: _rx(p, 0, lambda r: r["iq"].update(data="@@@@not-base64@@@@")), C.BAD_BASE64,
     "receivers[0].iq.data"),
    ("partial sample", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype="ci16", data=_b64(4 * 2400 + 2))),
     C.WRONG_LENGTH, "receivers[0].iq.data"),
    ("too short", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype="ci16", data=_b64(4 * 100))), C.WRONG_LENGTH,
     "receivers[0].iq"),
    ("too long", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype="ci16", data=_b64(4 * 300_000))), C.WRONG_LENGTH,
     "receivers[0].iq.data"),
    ("NaN", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype="complex64", data=_nan_b64(2400))), C.NON_FINITE,
     "receivers[0].iq"),
    ("finite but beyond any receiver (it gave NaN fixes)", lambda p: _rx(p, 0, lambda r: r["iq"].update(
        dtype="complex64", data=_const_b64(2400, 1e20))), C.OUT_OF_RANGE, "receivers[0].iq"),
    ("a gain_db that makes ci16 samples impossible", lambda p: _rx(p, 0, lambda r: (r["iq"].update(
        dtype="ci16", data=base64.b64encode(np.full(4800, 32767, "<i2").tobytes()).decode()),
        r.update(gain_db=-100.0))), C.OUT_OF_RANGE, "receivers[0].iq"),
    ("dtype is a list (unhashable: it raised TypeError)", lambda p: _rx(p, 0, lambda r: r["iq"].update(dtype=[])),
     C.UNSUPPORTED_DTYPE, "receivers[0].iq.dtype"),
    ("bad gain", lambda p: _rx(p, 0, lambda r: r.update(gain_db="high")), C.INVALID_FIELD, "receivers[0].gain_db"),
    ("infinite gain", lambda p: _rx(p, 0, lambda r: r.update(gain_db=float("inf"))), C.INVALID_FIELD,
     "receivers[0].gain_db"),
    ("iq_ref without store", lambda p: _rx(p, 0, lambda r: (r.pop("iq"), r.update(iq_ref="s3://raw/x.npy"))),
     C.IQ_REF_UNAVAILABLE, "receivers[0].iq_ref"),
    ("iq_ref not s3", lambda p: _rx(p, 0, lambda r: (r.pop("iq"), r.update(iq_ref="/etc/passwd"))),
     C.INVALID_FIELD, "receivers[0].iq_ref"),
    ("iq_ref without a bucket (it was retried for half an hour)", lambda p: _rx(
        p, 0, lambda r: (r.pop("iq"), r.update(iq_ref="s3:///x.npy"))), C.INVALID_FIELD, "receivers[0].iq_ref"),
    ("iq_ref with an invalid bucket name", lambda p: _rx(
        p, 0, lambda r: (r.pop("iq"), r.update(iq_ref="s3://Bad_Bucket!/x.npy"))), C.INVALID_FIELD, "receivers[0].iq_ref"),
]


def _rx(p: dict, i: int, change) -> dict:
    p = copy.deepcopy(p)
    p["receivers"] = [r for r in p["receivers"]]
    while len(p["receivers"]) < 3:
        p["receivers"].append(copy.deepcopy(p["receivers"][0]))
    change(p["receivers"][i])
    return p


def _const_b64(samples: int, value: float) -> str:
    return base64.b64encode(np.full(2 * samples, value, "<f4").tobytes()).decode()


def _nan_b64(samples: int) -> str:
    arr = np.zeros(2 * samples, "<f4")
    arr[7] = np.nan
    return base64.b64encode(arr.tobytes()).decode()


@pytest.mark.parametrize("name,mutate,code,field", CASES, ids=[c[0] for c in CASES])
def test_invalid_payloads_get_typed_errors(decoder, payload, name, mutate, code, field):
    raw = mutate(payload)
    if isinstance(raw, dict):  # through the wire, as a producer would send it
        raw = json.dumps(raw).encode()
    err = _code(decoder, raw)
    assert err.code == code, err
    assert err.field == field, err


def test_every_code_is_exercised():
    codes = {v for k, v in vars(C).items() if k.isupper()}
    # a conflict is found by the store and an unknown model by the service, not the decoder
    # (tests/worker/test_service.py)
    assert codes - {C.CONFLICT, C.UNKNOWN_MODEL} == {c[2] for c in CASES}


def test_a_decoded_object_with_20_mb_besides_its_iq_is_refused(decoder, payload):
    """What the worker gets from the broker is an object, not bytes: the byte cap alone never saw this."""
    err = _code(decoder, {**payload, "note": "x" * 20_000_000})
    assert err.code == C.PAYLOAD_TOO_LARGE and err.context["max_bytes"] == 64 * 1024


def test_msgpack_non_bytes_data_and_nested_junk(decoder, payload):
    doc = copy.deepcopy(payload)
    doc["receivers"][0]["iq"]["data"] = [1, 2, 3]
    assert _code(decoder, dumps(doc, "msgpack")).code == C.INVALID_FIELD


def test_payload_cap_also_counts_decoded_iq(spec, payload):
    small = PayloadDecoder(spec, Limits(max_payload_bytes=20_000))
    err = _code(small, payload)
    assert err.code == C.PAYLOAD_TOO_LARGE


def test_iq_ref_is_fetched_and_validated(spec, payload):
    rec = payload["receivers"][0]
    iq = iq_from_bytes(base64.b64decode(rec["iq"]["data"]), rec["iq"]["dtype"], rec.get("gain_db", 0.0))
    buf = io.BytesIO()
    np.save(buf, iq)
    store = {"s3://heimdall-raw-iq/a.npy": buf.getvalue()}
    dec = PayloadDecoder(spec, fetch_iq_ref=lambda url: store[url])
    by_ref = copy.deepcopy(payload)
    by_ref["receivers"][0] = {"id": rec["id"], "iq_ref": "s3://heimdall-raw-iq/a.npy"}
    np.testing.assert_allclose(dec.decode(by_ref).iq, dec.decode(payload).iq, rtol=1e-5, atol=1e-9)
    # a pickled object array is refused, not unpickled
    bad = io.BytesIO()
    np.save(bad, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    store["s3://heimdall-raw-iq/evil.npy"] = bad.getvalue()
    by_ref["receivers"][0]["iq_ref"] = "s3://heimdall-raw-iq/evil.npy"
    assert _code(dec, by_ref).code == C.DECODE_ERROR
    store["s3://heimdall-raw-iq/real.npy"] = _npy(np.zeros(4000, np.float32))
    by_ref["receivers"][0]["iq_ref"] = "s3://heimdall-raw-iq/real.npy"
    assert _code(dec, by_ref).code == C.UNSUPPORTED_DTYPE


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# -- properties over malformed payloads -----------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.text(max_size=20),
                         st.binary(max_size=40))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                             max_size=4), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2000))
def test_random_bytes_only_raise_payload_errors(decoder, raw):
    with pytest.raises(PayloadError):
        decoder.decode(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["schema", "captured_at", "center_freq_hz", "sample_rate_hz", "receivers", "options",
                            "request_id", "session_id"]), value=json_values)
def test_any_top_level_field_value_is_decoded_or_rejected_cleanly(decoder, sample, key, value):
    doc = {**sample.copy(), key: value}
    try:
        decoder.decode(msgpack.packb(doc, use_bin_type=True))
    except PayloadError as err:
        assert err.code in {v for k, v in vars(C).items() if k.isupper()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 2), key=st.sampled_from(["id", "iq", "gain_db", "iq_ref"]), value=json_values,
       sub=st.sampled_from(["dtype", "data", None]))
def test_any_receiver_field_value_is_decoded_or_rejected_cleanly(decoder, sample, index, key, value, sub):
    doc = sample.copy()
    rec = doc["receivers"][index]
    if sub is not None and key == "iq":
        rec["iq"][sub] = value
    else:
        rec[key] = value
    try:
        out = decoder.decode(doc)
        assert np.isfinite(out.iq.view(np.float32)).all()
    except PayloadError as err:
        assert err.field is None or err.field.startswith(("receivers", "schema"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 4000), flip=st.integers(0, 255))
def test_truncated_or_corrupted_serialisations_are_rejected_cleanly(decoder, sample, cut, flip):
    raw = bytearray(sample.raw[: len(sample.raw) - cut])
    if raw:
        raw[flip % len(raw)] ^= 0x5A
    try:
        decoder.decode(bytes(raw))
    except PayloadError:
        pass


def test_deeply_nested_document_is_rejected_not_crashing(decoder):
    raw = b"[" * 100_000 + b"]" * 100_000
    assert _code(decoder, raw).code in (C.DECODE_ERROR, C.PAYLOAD_TOO_LARGE)
    deep = b"\x91" * 100_000 + b"\xc0"  # msgpack: nested one-element arrays
    assert _code(decoder, deep).code in (C.DECODE_ERROR, C.PAYLOAD_TOO_LARGE)


def test_digest_can_be_skipped_for_paths_without_cache(decoder, payload):
    payload = {k: v for k, v in payload.items() if k != "request_id"}  # a request id always gets one
    with_key = decoder.decode(payload)
    without = decoder.decode(payload, digest=False)
    assert without.digest == "" and len(with_key.digest) == 35
    np.testing.assert_array_equal(without.iq, with_key.iq)


@pytest.mark.parametrize("rate", [2.225073858507e-311, 5e-324, 1e-300, 1.7e308, 12_000.0 * 9, 12_000.0 / 9])
def test_extreme_sample_rates_are_unsupported_not_a_crash(decoder, payload, rate):
    """Found by the fuzz once the decoder stopped turning every exception into invalid_field: a subnormal
    rate made the resampling ratio infinite (OverflowError)."""
    assert _code(decoder, {**payload, "sample_rate_hz": rate}).code == C.UNSUPPORTED_SAMPLE_RATE


def test_a_capture_a_few_hours_ahead_is_clock_skew_not_an_error(decoder, payload):
    assert decoder.decode({**payload, "captured_at": _days_ahead(0.2)}).captured_at


def test_metadata_besides_the_iq_is_bounded_but_the_iq_is_not_counted(decoder, payload):
    """IQ data of the largest allowed size passes the metadata cap; a few KB of ids and options too."""
    assert decoder.decode({**payload, "note": "n" * 60_000}).request_id == payload.get("request_id")


def test_a_request_id_makes_a_digest_even_without_the_cache(decoder, payload):
    doc = {**payload, "request_id": "with-id"}
    assert decoder.decode(doc, digest=False).digest  # what tells a conflict from a resubmission
    assert decoder.decode({k: v for k, v in doc.items() if k != "request_id"}, digest=False).digest == ""
