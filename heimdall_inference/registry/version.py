"""A registered model version, as the registry describes it (shared by the MLflow client and the REST reader)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RegisteredVersion", "DEFAULT_NAME"]

DEFAULT_NAME = "localization_model"


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered version as the registry describes it."""

    name: str
    version: str
    sha256: str
    aliases: tuple[str, ...] = ()
    source: str = ""
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": list(self.aliases), "sha256": self.sha256,
                "contract": self.tags.get("contract"), "model_version": self.tags.get("model_version"),
                "card": {k.removeprefix("card."): v for k, v in sorted(self.tags.items()) if k.startswith("card.")},
                "run_id": self.run_id, "source": self.source}
