"""Which of a child's models answers a request: the A/B split, ``options.model``, and the shadow.

A child holds one :class:`Arm` per model it serves: its own (``HEIMDALL_MODEL_URI``) and one per other
ref its :class:`~heimdall_inference.registry.routes.Routes` name (loaded beside it, sharing nothing but
the decoder's rules: every arm takes the same payloads and features). :class:`Router` applies the rules:

* ``options.model`` in a payload picks the arm it names, if the allow-list admits it (the served model,
  the split's arms, ``HEIMDALL_MODEL_ALLOW``); anything else is a ``PayloadError`` ``unknown_model``;
* otherwise the split draws the arm from a stable hash of the ``session_id`` (else the ``request_id``,
  else the task id): a session always meets the same arm, and a redelivered task the same model. The
  hash is a fixed point in [0, 1) per key and the arms take consecutive shares in the order given, so
  growing the last arm's share (a ramp-up) only moves sessions into it, never out of it;
* an arm that is not loaded now (its alias not set yet or removed, its version refused) gives its share
  of the split to the served model: the split never fails a request for a missing arm (a payload that
  names such an arm in ``options.model`` gets ``unknown_model``: it is never served by another model
  than the one it asked for);
* the shadow arm also runs on every request another arm served; its fix is stored, never returned;
* **bands**: a payload whose centre frequency lies outside the served model's bands goes to the *band
  model* (``HEIMDALL_BAND_MODELS``) whose declared bands hold it: one model per band of the network (2 m,
  70 cm), each with its own name, version and alias in the fix. The split, the shadow and the allow-list
  are the served model's (its band's); ``options.model`` on another band's payload may name that band's
  model only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..core.localizer import Localizer
from ..core.payload import DecodedPayload
from ..errors import PayloadCode, PayloadError
from ..registry.routes import Routes

__all__ = ["Arm", "Router", "draw"]


@dataclass(frozen=True, eq=False)
class Arm:
    """One model a child serves, and the names fixes and requests know it by."""

    localizer: Localizer
    alias: str | None = None  #: the alias fixes name (None: a pinned version, a file, the shipped model)
    ref: str | None = None  #: the routes' name for it (None: the worker's own model)
    source: str = "shipped"  #: where the file came from (registry, cache, file, shipped)

    @property
    def name(self) -> str:
        return self.localizer.name

    @property
    def version(self) -> str:
        return self.localizer.version

    @property
    def cache_key(self) -> str:
        """The prediction cache's model key: version and file hash, so a new model never serves a stale fix."""
        return f"{self.localizer.version}-{self.localizer.session.sha256[:12]}"

    def names(self) -> set[str]:
        """What ``options.model`` may call it: its version, bare or with the model's name, and its alias likewise."""
        name, version = self.name, self.version
        out = {version, f"{name}/{version}", f"models:/{name}/{version}"}
        for label in {self.alias, self.ref} - {None}:
            if label.isdigit():
                continue
            out |= {label, f"{name}@{label}", f"models:/{name}@{label}"}
        return out


def draw(key: str) -> float:
    """A stable point in [0, 1) for ``key`` (the same on every worker, in every process, across restarts)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, person=b"heimdall-ab").digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


class Router:
    """The routing rules over the arms a child has loaded now (rebuilt whole when a model swaps)."""

    def __init__(self, primary: Arm, others: Mapping[str, Arm] | None = None, routes: Routes | None = None,
                 primary_ref: str | None = None, bands: Sequence[Arm] = ()) -> None:
        self.primary = primary
        self.bands = tuple(bands)  #: the other bands' models (their bands disjoint from the served model's and each other's)
        self.routes = routes or Routes()
        others = dict(others or {})
        self._arm: dict[str, Arm] = {ref: arm for ref, arm in others.items()}
        if primary_ref is not None:
            self._arm[primary_ref] = primary
        self._names: dict[str, Arm] = {n: primary for n in primary.names()}
        for ref in [r for r, _ in self.routes.split] + list(self.routes.allow):
            arm = self._arm.get(ref)
            if arm is not None:
                for n in arm.names():
                    self._names.setdefault(n, arm)
        self.shadow = self._arm.get(self.routes.shadow) if self.routes.shadow else None

    @property
    def arms(self) -> list[Arm]:
        """Every distinct arm of the served model's band, the served model first (the band models are :attr:`bands`)."""
        out = [self.primary]
        for arm in self._arm.values():
            if all(arm is not a for a in out):
                out.append(arm)
        return out

    @property
    def bands_hz(self) -> tuple[tuple[float, float], ...]:
        """Every centre-frequency band some model here serves."""
        return tuple(b for arm in (self.primary, *self.bands) for b in arm.localizer.spec.bands_hz)

    def band_arm(self, center_freq_hz: float) -> Arm | None:
        """The band model for a centre frequency outside the served model's bands (None: the served model's band)."""
        if self.primary.localizer.serves_frequency(center_freq_hz):
            return None
        return next((a for a in self.bands if a.localizer.serves_frequency(center_freq_hz)), None)

    def arm(self, ref: str) -> Arm | None:
        """The arm loaded for ``ref`` (an alias or version the routes name), if any."""
        return self._arm.get(ref)

    @property
    def serves(self) -> frozenset[str]:
        """Every name ``options.model`` may use here."""
        return frozenset(self._names)

    def choose(self, decoded: DecodedPayload, task_id: str | None = None) -> Arm:
        """The arm that answers this request; PayloadError ``unknown_model`` for an ``options.model`` not allowed."""
        wanted = decoded.options.model
        band = self.band_arm(decoded.center_freq_hz)
        if band is not None:
            if wanted is not None and wanted not in band.names():
                raise PayloadError(PayloadCode.UNKNOWN_MODEL, f"options.model {wanted[:64]!r} is not served for "
                                   f"{decoded.center_freq_hz:.0f} Hz here; {band.name} serves it as "
                                   f"{sorted(band.names())}", "options.model")
            return band
        if wanted is not None:
            arm = self._names.get(wanted)
            if arm is None:
                raise PayloadError(PayloadCode.UNKNOWN_MODEL, f"options.model {wanted[:64]!r} is not served here; this "
                                   f"worker serves {sorted(self.serves)}", "options.model")
            return arm
        key = decoded.session_id or decoded.request_id or task_id
        if not self.routes.split or key is None:
            return self.primary
        u, edge = draw(key), 0.0
        for ref, share in self.routes.split:
            edge += share
            if u < edge:
                return self._arm.get(ref, self.primary)
        return self._arm.get(self.routes.split[-1][0], self.primary)  # u within rounding of 1.0

    def shadow_for(self, arm: Arm) -> Arm | None:
        """The shadow arm, when it is another model than the one that served (and that one serves the shadow's band:
        a band model has no shadow)."""
        s = self.shadow
        if s is None or s.localizer is arm.localizer or any(arm is b for b in self.bands):
            return None
        return s
