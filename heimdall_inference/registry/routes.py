"""The operator's routing rules: which registered versions a worker serves beside its own, and to whom.

Three settings, each a list of *refs* of the model ``HEIMDALL_MODEL_URI`` names (an alias such as
``challenger``, or a version number such as ``7``):

* ``HEIMDALL_MODEL_SPLIT`` (``production=90,challenger=10``): a weighted A/B split. A request's arm is
  drawn from a stable hash of its ``session_id`` (else its ``request_id``, else its task id), so one
  session always meets the same arm, and a redelivered task the same model.
* ``HEIMDALL_MODEL_SHADOW`` (``challenger``): also run this model on every fix another model served, in
  the same pass on the same features; its fix is stored beside the served one, never returned.
* ``HEIMDALL_MODEL_ALLOW`` (``challenger,7``): what a payload's ``options.model`` may ask for besides
  the served model and the split's arms; anything else is a ``PayloadError`` ``unknown_model``.

Nothing here loads a model: :mod:`.resolve` resolves each ref, the worker's router
(:mod:`heimdall_inference.worker.routing`) applies the rules.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError
from .uri import ALIAS_PATTERN, ModelUri

__all__ = ["Routes", "parse_routes", "REF_PATTERN", "ref_of"]

REF_PATTERN = rf"(?:{ALIAS_PATTERN}|[0-9]{{1,9}})"
_REF = re.compile(rf"^{REF_PATTERN}$")
_MAX_REFS = 8  #: each ref is one more ONNX session in every child


@dataclass(frozen=True)
class Routes:
    """Parsed routing rules (no split, no shadow, no allow-list: the served model answers everything)."""

    split: tuple[tuple[str, float], ...] = ()  #: (ref, share) in the order given; shares sum to 1
    shadow: str | None = None
    allow: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.split or self.shadow or self.allow)

    def refs(self, primary: str | None = None) -> tuple[str, ...]:
        """Every ref a worker must load besides ``primary`` (its own), in a stable order."""
        seen: dict[str, None] = {}
        for ref in [r for r, _ in self.split] + ([self.shadow] if self.shadow else []) + list(self.allow):
            if ref != primary:
                seen.setdefault(ref, None)
        return tuple(seen)


def ref_of(uri: ModelUri) -> str | None:
    """The ref a registry URI serves under (its alias, else its version); None for a file or the shipped model."""
    if uri.kind != "registry":
        return None
    return uri.alias or uri.version


def parse_routes(split: str = "", shadow: str = "", allow: str = "") -> Routes:
    """Parse the three settings; raises :class:`ConfigError` naming what is wrong."""
    arms: list[tuple[str, float]] = []
    for part in (p.strip() for p in split.split(",") if p.strip()):
        ref, sep, weight = part.partition("=")
        ref = ref.strip()
        if not sep or not _REF.match(ref):
            raise ConfigError(f"HEIMDALL_MODEL_SPLIT: {part!r} is not <alias or version>=<weight>")
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"HEIMDALL_MODEL_SPLIT: the weight of {ref!r} is not a number ({weight.strip()!r})") \
                from None
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"HEIMDALL_MODEL_SPLIT: the weight of {ref!r} must be a finite number >= 0")
        if ref in (r for r, _ in arms):
            raise ConfigError(f"HEIMDALL_MODEL_SPLIT: {ref!r} is named twice")
        arms.append((ref, w))
    total = sum(w for _, w in arms)
    if arms and total <= 0:
        raise ConfigError("HEIMDALL_MODEL_SPLIT: the weights add up to 0")
    if len(arms) == 1:
        raise ConfigError("HEIMDALL_MODEL_SPLIT: a split needs two arms or more (one arm is HEIMDALL_MODEL_URI)")
    shadow = shadow.strip()
    if shadow and not _REF.match(shadow):
        raise ConfigError(f"HEIMDALL_MODEL_SHADOW: {shadow!r} is not an alias or a version")
    allowed: list[str] = []
    for ref in (p.strip() for p in allow.split(",") if p.strip()):
        if not _REF.match(ref):
            raise ConfigError(f"HEIMDALL_MODEL_ALLOW: {ref!r} is not an alias or a version")
        if ref not in allowed:
            allowed.append(ref)
    routes = Routes(split=tuple((r, w / total) for r, w in arms), shadow=shadow or None, allow=tuple(allowed))
    if len(routes.refs()) > _MAX_REFS:
        raise ConfigError(f"the routes name {len(routes.refs())} models; at most {_MAX_REFS} (each is one more "
                          "ONNX session in every worker child)")
    return routes
