"""``HEIMDALL_MODEL_URI``: what a worker is told to serve.

* ``""``: the model shipped in the package (the embedded default, the 2 m band's);
* ``shipped:<band>``: the model shipped in the package for that band (``shipped:2m``, ``shipped:70cm``);
* a path (``/models/x.onnx``, ``file:///models/x.onnx``): that ONNX file;
* ``models:/<name>@<alias>``: the version the registry's alias points at (``production``, ``challenger``);
* ``models:/<name>/<version>``: that registered version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError

__all__ = ["ModelUri", "parse_model_uri", "NAME_PATTERN", "ALIAS_PATTERN", "SHIPPED_BANDS"]

SHIPPED_BANDS = ("2m", "70cm")
"""The bands the package ships a model for (``heimdall_inference/models``)."""

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
ALIAS_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
_REGISTRY = re.compile(rf"^models:/(?P<name>{NAME_PATTERN})(?:@(?P<alias>{ALIAS_PATTERN})|/(?P<version>[0-9]{{1,9}}))$")


@dataclass(frozen=True)
class ModelUri:
    """A parsed model URI."""

    kind: Literal["shipped", "file", "registry"]
    path: Path | None = None  #: kind "file"; kind "shipped": the band's model (None: the default, 2 m)
    band: str | None = None  #: kind "shipped" with a band
    name: str | None = None  #: kind "registry"
    alias: str | None = None  #: kind "registry", by alias
    version: str | None = None  #: kind "registry", by version

    def __str__(self) -> str:
        if self.kind == "registry":
            return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"
        if self.kind == "shipped":
            return f"shipped:{self.band}" if self.band else "(the shipped model)"
        return str(self.path)


def parse_model_uri(text: str) -> ModelUri:
    """Parse ``HEIMDALL_MODEL_URI``; raises :class:`ConfigError` for a ``models:`` URI it cannot read."""
    text = text.strip()
    if not text:
        return ModelUri("shipped")
    if text.startswith("shipped:"):
        band = text.removeprefix("shipped:")
        if band not in SHIPPED_BANDS:
            raise ConfigError(f"model URI {text!r}: the package ships models for {', '.join(SHIPPED_BANDS)}")
        from ..core.session import shipped_model_path

        return ModelUri("shipped", path=shipped_model_path(band), band=band)
    if text.startswith("models:"):
        m = _REGISTRY.match(text)
        if m is None:
            raise ConfigError(f"model URI {text!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        return ModelUri("registry", name=m["name"], alias=m["alias"], version=m["version"])
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"model URI {text!r}: a file path, file://, or models:/<name>@<alias>")
    return ModelUri("file", path=Path(text.removeprefix("file://")))
