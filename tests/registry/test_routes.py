"""HEIMDALL_MODEL_SPLIT, HEIMDALL_MODEL_SHADOW and HEIMDALL_MODEL_ALLOW: parsed once, each mistake one clear line."""

from __future__ import annotations

import pytest

from heimdall_inference.errors import ConfigError
from heimdall_inference.registry.routes import Routes, parse_routes
from heimdall_inference.settings import Settings


def test_a_split_is_normalised_and_keeps_its_order():
    r = parse_routes("production=9, challenger=1", "challenger", "7,challenger,7")
    assert r.split == (("production", 0.9), ("challenger", 0.1)) and r.shadow == "challenger"
    assert r.allow == ("7", "challenger") and r.active
    assert r.refs("production") == ("challenger", "7")  # every model to load besides the worker's own
    assert parse_routes() == Routes() and not Routes().active
    assert parse_routes("a=1,b=0").split == (("a", 1.0), ("b", 0.0))  # an arm switched off stays loaded


@pytest.mark.parametrize("split, shadow, allow, message", [
    ("production", "", "", "is not <alias or version>=<weight>"),
    ("production=x,challenger=1", "", "", "is not a number"),
    ("production=-1,challenger=1", "", "", "finite number >= 0"),
    ("production=nan,challenger=1", "", "", "finite number >= 0"),
    ("a=0,b=0", "", "", "add up to 0"),
    ("production=1", "", "", "needs two arms"),
    ("a=1,a=2", "", "", "named twice"),
    ("a b=1,c=1", "", "", "is not <alias or version>"),
    ("", "chall enger", "", "HEIMDALL_MODEL_SHADOW"),
    ("", "", "ok,../x", "HEIMDALL_MODEL_ALLOW"),
    ("", "", ",".join(f"a{i}" for i in range(9)), "at most 8"),
])
def test_each_mistake_is_one_line(split, shadow, allow, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_routes(split, shadow, allow)


def test_settings_refuse_routes_without_a_registry_model(monkeypatch):
    monkeypatch.setenv("HEIMDALL_MODEL_SPLIT", "production=9,challenger=1")
    with pytest.raises(ConfigError, match="set HEIMDALL_MODEL_URI=models:/<name>@<alias>"):
        Settings.from_env()
    monkeypatch.setenv("HEIMDALL_MODEL_URI", "models:/localization_model@production")
    assert Settings.from_env().routes().split[1] == ("challenger", 0.1)
    monkeypatch.setenv("HEIMDALL_MODEL_SPLIT", "production=9")
    with pytest.raises(ConfigError, match="needs two arms"):
        Settings.from_env()
