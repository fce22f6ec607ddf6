"""Redis prediction cache (design.md §6): a fix keyed by model version + payload digest.

The payload digest covers receiver ids, encodings, gains and IQ bytes; the model version is part
of the key, so a new model never serves a stale fix. The cache is an optimisation: a Redis error
is logged and counted as a miss, never a failed task.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis

__all__ = ["FixCache"]

log = logging.getLogger(__name__)


class FixCache:
    """get/put of fix documents with a TTL; hits and misses are counted."""

    def __init__(self, url: str, *, ttl_s: int = 86_400, prefix: str = "heimdall:") -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.hits = 0
        self.misses = 0
        self.errors = 0

    def key(self, model_version: str, digest: str) -> str:
        return f"{self.prefix}fix:{model_version}:{digest}"

    def get(self, model_version: str, digest: str) -> dict[str, Any] | None:
        try:
            raw = self.client.get(self.key(model_version, digest))
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("prediction cache unavailable (%s); computing the fix", exc)
            raw = None
        if raw is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(raw)

    def put(self, model_version: str, digest: str, fix: dict[str, Any]) -> None:
        try:
            self.client.set(self.key(model_version, digest), json.dumps(fix), ex=self.ttl_s)
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("prediction cache unavailable (%s); fix not cached", exc)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        self.client.close()
