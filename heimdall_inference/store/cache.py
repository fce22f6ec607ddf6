"""Redis prediction cache: a fix keyed by model version + payload digest.

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
        return self.get_many(model_version, [digest])[0]

    def get_many(self, model_version: str, digests: list[str]) -> list[dict[str, Any] | None]:
        """One round trip (MGET) for a micro-batch; a Redis error is a miss for all of them."""
        if not digests:
            return []
        try:
            raws = self.client.mget([self.key(model_version, d) for d in digests])
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("prediction cache unavailable (%s); computing the fix", exc)
            raws = [None] * len(digests)
        out = [json.loads(r) if r is not None else None for r in raws]
        hits = sum(o is not None for o in out)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def put(self, model_version: str, digest: str, fix: dict[str, Any]) -> None:
        self.put_many(model_version, [(digest, fix)])

    def put_many(self, model_version: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        """One round trip (a pipeline of SETs with the TTL) for a micro-batch."""
        if not items:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for digest, fix in items:
                    pipe.set(self.key(model_version, digest), json.dumps(fix), ex=self.ttl_s)
                pipe.execute()
        except redis.RedisError as exc:
            self.errors += 1
            log.warning("prediction cache unavailable (%s); fix not cached", exc)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        self.client.close()
