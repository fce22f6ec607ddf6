"""Redis prediction cache: a fix keyed by model version + payload digest.

The payload digest covers receiver ids, encodings, gains and IQ bytes; the model version is part
of the key, so a new model never serves a stale fix. The cache is an optimisation: a Redis error
is a miss, never a failed task, and it opens a :class:`~heimdall_inference.ops.breaker.Breaker`: the
cache is skipped while a PING (every 5 s, doubling up to 60 s, in the breaker's own thread) gets no
answer, so an unreachable, unresolvable or hanging cache costs one failed lookup per outage, not
one per request. Each call is a single try with short timeouts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..ops.breaker import FAILED, SKIPPED, Breaker

__all__ = ["FixCache"]

log = logging.getLogger(__name__)


class FixCache:
    """get/put of fix documents with a TTL; hits and misses are counted."""

    def __init__(self, url: str, *, ttl_s: int = 86_400, prefix: str = "heimdall:",
                 breaker: Breaker | None = None) -> None:
        # one try per call (redis-py would retry 3 times with backoff): the breaker decides when to try again
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                           retry=Retry(NoBackoff(), 0))
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.breaker = breaker or Breaker("the prediction cache (Redis)", base_s=5.0, max_s=60.0,
                                          probe=lambda: self.client.ping())
        self.hits = 0
        self.misses = 0
        self.errors = 0  #: failed calls (each opened the breaker)
        self.skipped = 0  #: calls not made while the breaker was open

    def key(self, model_version: str, digest: str) -> str:
        return f"{self.prefix}fix:{model_version}:{digest}"

    def get(self, model_version: str, digest: str) -> dict[str, Any] | None:
        return self.get_many(model_version, [digest])[0]

    def get_many(self, model_version: str, digests: list[str]) -> list[dict[str, Any] | None]:
        """One round trip (MGET) for a micro-batch; a Redis error is a miss for all of them."""
        if not digests:
            return []
        raws = self._call(lambda: self.client.mget([self.key(model_version, d) for d in digests]))
        if raws is None:
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

        def put() -> None:
            with self.client.pipeline(transaction=False) as pipe:
                for digest, fix in items:
                    pipe.set(self.key(model_version, digest), json.dumps(fix), ex=self.ttl_s)
                pipe.execute()

        self._call(put)

    def _call(self, fn: Any) -> Any:
        """``fn()`` unless the breaker is open; None (a miss, nothing cached) when skipped or failed."""
        out = self.breaker.call(fn, redis.RedisError)
        if out is SKIPPED:
            self.skipped += 1
        elif out is FAILED:
            self.errors += 1
        else:
            return out
        return None

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def close(self) -> None:
        self.client.close()
