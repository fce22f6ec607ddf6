"""The shipped model honours the model contract; onnxruntime errors are translated."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.errors import InferenceError, ModelLoadError
from heimdall_inference.core.session import ModelSession, SessionOptions, default_model_path


def test_shipped_model_contract(localizer):
    s = localizer.session
    assert default_model_path().stat().st_size < 5 * 1024 * 1024  # "a few MB at most"
    spec = s.spec
    assert spec.name == "localization_model"
    assert spec.network.ids == ("giaveno", "montanaro", "torino", "coazze", "passo_giovi", "genova", "milano")
    assert spec.sample_rate_hz == 12_000.0 and spec.snippet_samples == 2400
    assert spec.min_receivers == 3
    assert spec.features.offset_db == -120.0  # fixed normalisation constants from training
    assert set(spec.card["evaluations"]) == {"nominal", "wide"} and spec.version == "2"
    info = s.info()
    assert info["sha256"] == s.sha256 and len(s.sha256) == 64
    assert info["providers"] == ["CPUExecutionProvider"]


def test_mask_not_zeros_decides_absent_receivers(localizer):
    """Whatever an absent receiver's feature slot holds, a masked slot changes nothing."""
    rng = np.random.default_rng(0)
    m, t = localizer.plan.shape
    feats = rng.normal(1.0, 0.5, (4, 7, m, t)).astype(np.float32)
    mask = np.ones((4, 7), np.float32)
    mask[:, [1, 4, 6]] = 0.0
    garbage = feats.copy()
    garbage[:, [1, 4, 6]] = rng.normal(3.0, 2.0, (4, 3, m, t))
    zeros = feats.copy()
    zeros[:, [1, 4, 6]] = 0.0
    a, b, c = (localizer.session.run(f, mask) for f in (feats, garbage, zeros))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[1], c[1])
    # ... while the mask itself matters
    d = localizer.session.run(feats, np.ones((4, 7), np.float32))
    assert not np.allclose(a[0], d[0])


def test_bad_files_are_model_load_errors(tmp_path):
    with pytest.raises(ModelLoadError):
        ModelSession(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(ModelLoadError):
        ModelSession(junk)


def test_model_without_metadata_or_wrong_io_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(default_model_path()))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ModelLoadError, match="metadata"):
        ModelSession(bare)
    proto = onnx.load(str(default_model_path()))
    proto.graph.output[0].name = "position"
    for node in proto.graph.node:
        node.output[:] = ["position" if o == "mean" else o for o in node.output]
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    with pytest.raises(ModelLoadError, match="output mean"):
        ModelSession(renamed)


def test_inference_errors_are_translated(localizer):
    with pytest.raises(InferenceError):
        localizer.session.run(np.zeros((1, 7, 3, 3), np.float32), np.ones((1, 7), np.float32))


def test_unavailable_provider_falls_back_to_cpu():
    s = ModelSession(options=SessionOptions(providers=("NoSuchExecutionProvider",), intra_op_threads=2))
    assert s.providers == ["CPUExecutionProvider"]
