"""Other models for tests: the shipped one with a known change, so that two models' fixes differ by what a test
can predict (an A/B arm, a shadow)."""

from __future__ import annotations

import json
from pathlib import Path

from heimdall_inference.core.session import default_model_path
from heimdall_inference.core.spec import METADATA_KEY


def shifted_model(dst: Path, *, east_m: float = 2000.0, north_m: float = 0.0, version: str = "2") -> Path:
    """The shipped model whose every position is moved by (east_m, north_m), its covariance untouched, with
    ``version`` in its own metadata. Written to ``dst``."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(default_model_path()))
    producer = next(n for n in m.graph.node if "mean" in n.output)
    producer.output[list(producer.output).index("mean")] = "mean_unshifted"
    m.graph.initializer.append(numpy_helper.from_array(np.array([east_m, north_m], np.float32), "mean_shift"))
    m.graph.node.append(helper.make_node("Add", ["mean_unshifted", "mean_shift"], ["mean"], name="test_shift"))
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            doc = json.loads(p.value)
            doc["version"] = version
            p.value = json.dumps(doc, sort_keys=True)
    onnx.checker.check_model(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return dst
