"""The fast paths give what the pipeline gave before them (tests/reference/: frozen copies of the stages):

* the decoder: the same outcome for every input, valid or not — the same typed error (code, field, message,
  context) or the same payload (fields, IQ bit for bit, wire size; the digest is BLAKE3 now, named ``b3:``);
* the features: the same values within float32 rounding, far below what moves the model's output;
* the fix documents: the same documents.
"""

from __future__ import annotations

import base64
import copy
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heimdall_inference.core.codec import dumps
from heimdall_inference.core.payload import Limits, PayloadDecoder
from heimdall_inference.errors import PayloadError

from ..reference.payload_v1 import PayloadDecoder as ReferenceDecoder
from .test_payload import CASES, json_values

_FIELDS = ("captured_at", "center_freq_hz", "sample_rate_hz", "receiver_ids", "request_id", "session_id", "options",
           "size_bytes")


def _outcome(decoder, raw):
    try:
        d = decoder.decode(raw)
    except PayloadError as err:
        return ("error", err.code, err.field, err.message, err.context)
    fields = tuple((v.cache, v.model) if f == "options" else v for f, v in ((f, getattr(d, f)) for f in _FIELDS))
    return ("ok", fields, d.iq, bool(d.digest))


def assert_same(new: PayloadDecoder, old: ReferenceDecoder, raw) -> None:
    a, b = _outcome(new, copy.deepcopy(raw)), _outcome(old, copy.deepcopy(raw))
    assert a[0] == b[0], (a[:4], b[:4])
    if a[0] == "error":
        assert a == b
    else:
        assert a[1] == b[1] and a[3] == b[3]
        np.testing.assert_array_equal(a[2], b[2])  # bit for bit
        assert a[2].dtype == np.complex64 and a[2].flags.c_contiguous


@pytest.fixture(scope="module")
def decoders(spec):
    return PayloadDecoder(spec), ReferenceDecoder(spec)


def test_every_valid_payload_decodes_the_same_as_before(decoders, scenes_and_payloads):
    for doc in scenes_and_payloads[1]:
        for raw in (doc, dumps(doc, "json"), dumps(doc, "msgpack")):
            assert_same(*decoders, raw)


@pytest.mark.parametrize("name,mutate,code,field", CASES, ids=[c[0] for c in CASES])
def test_every_invalid_case_gets_the_same_error_as_before(decoders, payload, name, mutate, code, field):
    raw = mutate(payload)
    assert_same(*decoders, raw)
    if isinstance(raw, dict):
        assert_same(*decoders, dumps(raw, "json"))


def _samples(dtype: str, values: np.ndarray) -> str:
    return base64.b64encode(np.asarray(values, "<i2" if dtype == "ci16" else "<f4").tobytes()).decode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["ci16", "complex64"]),
       fill=st.one_of(st.integers(-32768, 32767), st.floats(allow_nan=True, allow_infinity=True, width=32)),
       at=st.integers(0, 9999), gain=st.one_of(st.floats(-200, 200), st.sampled_from([0.0, -100.0, -80.0, 200.0])),
       samples=st.sampled_from([100, 2399, 2400, 2401, 5000]),
       second=st.one_of(st.none(), st.tuples(st.integers(0, 9999), st.sampled_from([np.nan, np.inf, 1e20, 3e4]))))
def test_edge_samples_and_gains_decode_or_fail_the_same_as_before(decoders, payload, dtype, fill, at, gain, samples,
                                                                  second):
    """One or two odd samples anywhere in a snippet of any length (the part the model reads, and past it), any
    gain: the peak check (NaN, Inf, out of range), the length check and the conversion agree with the decoder
    before the fast paths."""
    doc = copy.deepcopy(payload)
    values = np.zeros(2 * samples, np.float64)
    if dtype == "ci16":
        values[:] = np.arange(2 * samples) % 2000 - 1000
        fill = int(fill) if isinstance(fill, int) else (0 if not math.isfinite(fill) else
                                                        int(np.clip(fill, -32768, 32767)))
    values[at % values.size] = fill
    if second is not None and dtype == "complex64":
        values[second[0] % values.size] = second[1]
    doc["receivers"][0]["iq"] = {"dtype": dtype, "data": _samples(dtype, values)}
    doc["receivers"][0]["gain_db"] = gain
    with np.errstate(all="ignore"):
        assert_same(*decoders, doc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["schema", "captured_at", "center_freq_hz", "sample_rate_hz", "receivers", "options",
                            "request_id", "session_id", "note"]), value=json_values)
def test_any_top_level_value_gets_the_same_outcome_as_before(decoders, payload, key, value):
    assert_same(*decoders, msgpack.packb({**copy.deepcopy(payload), key: value}, use_bin_type=True))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, 2), key=st.sampled_from(["id", "iq", "gain_db", "iq_ref", "extra"]), value=json_values,
       sub=st.sampled_from(["dtype", "data", "other", None]))
def test_any_receiver_value_gets_the_same_outcome_as_before(decoders, payload, index, key, value, sub):
    doc = copy.deepcopy(payload)
    rec = doc["receivers"][index]
    if sub is not None and key == "iq":
        rec["iq"][sub] = value
    else:
        rec[key] = value
    assert_same(*decoders, doc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cap=st.integers(1024, 120_000), metadata=st.integers(0, 70_000), rate=st.sampled_from([12_000.0, 24_000.0,
                                                                                              6_000.0, 48_000.0]))
def test_caps_and_other_rates_get_the_same_outcome_as_before(spec, payload, cap, metadata, rate):
    """Resampled payloads, the IQ byte cap met at any receiver, metadata just under and over its cap."""
    doc = copy.deepcopy(payload)
    doc["sample_rate_hz"] = rate
    doc["receivers"][1]["comment"] = "c" * metadata
    limits = Limits(max_payload_bytes=cap)
    assert_same(PayloadDecoder(spec, limits), ReferenceDecoder(spec, limits), doc)


# -- features ------------------------------------------------------------------------------------

def test_features_equal_the_stft_plan_within_float32_rounding(localizer, scenes_and_payloads):
    """Every payload's features against scipy.signal.stft's plan (the one the shipped models were trained on): the
    largest difference is a few float32 ulps of the normalised log-power (1e-6 of a 20 dB unit, 2e-5 dB), and the
    model's outputs move by far less than a metre."""
    from ..reference.features_v1 import FeaturePlan as ReferencePlan

    decoded = [localizer.decode(d) for d in scenes_and_payloads[1]]
    iq = np.concatenate([d.iq for d in decoded])
    new, old = localizer.plan(iq), ReferencePlan(localizer.spec.features)(iq)
    assert new.shape == old.shape and new.dtype == old.dtype == np.float32 and new.flags.c_contiguous
    assert np.abs(new - old).max() < 5e-6
    fb = localizer.features(decoded)
    ref = np.zeros_like(fb.feats)
    rows, slots = zip(*[(i, localizer.spec.network.index[r]) for i, d in enumerate(decoded) for r in d.receiver_ids])
    ref[list(rows), list(slots)] = old
    mean_new, cov_new = localizer.session.run(fb.feats, fb.mask)
    mean_old, cov_old = localizer.session.run(ref, fb.mask)
    assert np.abs(mean_new - mean_old).max() < 1.0  # metres
    assert np.abs(cov_new - cov_old).max() < 1e-4  # log sigma, correlation


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), level_db=st.floats(-60, 60), shape=st.sampled_from([(1,), (3,), (2, 4)]))
def test_features_of_any_iq_equal_the_stft_plans(localizer, seed, level_db, shape):
    from ..reference.features_v1 import FeaturePlan as ReferencePlan

    rng = np.random.default_rng(seed)
    n = localizer.spec.snippet_samples
    iq = ((rng.standard_normal((*shape, n)) + 1j * rng.standard_normal((*shape, n))) * 10 ** (level_db / 20)
          ).astype(np.complex64)
    new, old = localizer.plan(iq), ReferencePlan(localizer.spec.features)(iq)
    assert new.shape == old.shape == (*shape, localizer.spec.features.n_mels, localizer.spec.features.frames)
    assert np.abs(new - old).max() < 5e-6


# -- fix documents --------------------------------------------------------------------------------

def test_fix_documents_equal_the_ones_before(localizer, scenes_and_payloads):
    """The vectorised documents (one conversion per field for the batch, the quality flag's hull distances at once)
    are the documents of before, value for value, for every scene and for odd covariances."""
    from heimdall_inference.core.fix import build_fixes

    from ..reference.fix_v1 import build_fixes as reference_fixes

    decoded = [localizer.decode(d) for d in scenes_and_payloads[1]]
    est = localizer.estimate(decoded)
    spec = localizer.spec
    kw = dict(timings_ms={"decode": 0.1}, task_ids=[f"t{i}" for i in range(len(decoded))], alias="production")
    assert build_fixes(decoded, est.mean_enu, est.cov, spec, **kw) == reference_fixes(decoded, est.mean_enu, est.cov,
                                                                                    spec, **kw)
    # degenerate and extreme covariances, positions far outside the network
    cov = est.cov.copy()
    cov[0] = [[1e-6, 0.0], [0.0, 1e-6]]
    cov[1] = [[4e10, 3.9e10], [3.9e10, 4e10]]
    mean = est.mean_enu.copy()
    mean[2] = [400_000.0, -350_000.0]
    assert build_fixes(decoded, mean, cov, spec, **kw) == reference_fixes(decoded, mean, cov, spec, **kw)


def test_a_nan_past_the_snippet_beside_an_out_of_range_sample_in_it_is_non_finite_as_before(decoders, payload):
    doc = copy.deepcopy(payload)
    values = np.zeros(2 * 3000, np.float32)
    values[10], values[5500] = 1e20, np.nan  # the first in the part the model reads, the second past it
    doc["receivers"][0]["iq"] = {"dtype": "complex64", "data": base64.b64encode(values.tobytes()).decode()}
    assert_same(*decoders, doc)
    assert _outcome(decoders[0], doc)[1] == "non_finite"
