"""The Redis prediction cache: hits, misses, model-version keys, and a dead Redis is a miss."""

from __future__ import annotations

import uuid

import pytest

from heimdall_inference.store.cache import FixCache

from ..live import REDIS_URL, port_open, unavailable


@pytest.fixture()
def cache():
    if not port_open(REDIS_URL.split("//", 1)[1].split("/", 1)[0]):
        unavailable("Redis")
    prefix = f"heimdall-test-{uuid.uuid4().hex[:8]}:"
    c = FixCache(REDIS_URL, ttl_s=60, prefix=prefix)
    yield c
    keys = list(c.client.scan_iter(f"{prefix}*"))
    if keys:
        c.client.delete(*keys)
    c.close()


def test_hit_miss_and_ttl(cache):
    assert cache.get("1", "abc") is None
    cache.put("1", "abc", {"schema": "heimdall.fix/v1", "x": 1})
    assert cache.get("1", "abc") == {"schema": "heimdall.fix/v1", "x": 1}
    assert cache.get("2", "abc") is None  # a new model never serves an old fix
    assert (cache.hits, cache.misses) == (1, 2) and cache.hit_rate == pytest.approx(1 / 3)
    assert 0 < cache.client.ttl(cache.key("1", "abc")) <= 60


def test_unreachable_redis_is_a_miss_not_an_error():
    c = FixCache("redis://127.0.0.1:1/0")
    assert c.get("1", "abc") is None
    c.put("1", "abc", {"x": 1})
    assert (c.errors, c.misses) == (2, 1)
