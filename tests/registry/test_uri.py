"""HEIMDALL_MODEL_URI: the shipped model, a file, or a registered model by alias or version."""

from __future__ import annotations

from pathlib import Path

import pytest

from heimdall_inference.errors import ConfigError
from heimdall_inference.registry.uri import ModelUri, parse_model_uri


@pytest.mark.parametrize("text, want", [
    ("", ModelUri("shipped")),
    ("/models/x.onnx", ModelUri("file", path=Path("/models/x.onnx"))),
    ("file:///models/x.onnx", ModelUri("file", path=Path("/models/x.onnx"))),
    ("models:/localization_model@production", ModelUri("registry", name="localization_model", alias="production")),
    ("models:/localization_model/12", ModelUri("registry", name="localization_model", version="12")),
])
def test_model_uris_parse(text, want):
    assert parse_model_uri(text) == want
    assert str(parse_model_uri(text)) == (text.removeprefix("file://") if text else "(the shipped model)")


@pytest.mark.parametrize("text", ["models:/x", "models:/x@", "models:/x/latest", "models:/x@1bad", "models:/../x@a",
                                  "s3://bucket/model.onnx", "models:/x@a/b"])
def test_unreadable_model_uris_are_config_errors(text):
    with pytest.raises(ConfigError, match="model URI"):
        parse_model_uri(text)
