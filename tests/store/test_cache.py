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
    assert (c.errors, c.skipped, c.misses) == (1, 1, 1)  # one attempt, then the breaker skips the cache


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("url", ["redis://unresolvable-host.invalid:6379/1", "hang"])
def test_a_dead_or_hanging_cache_costs_one_attempt_per_breaker_interval(url):
    """An unresolvable cache host or one that accepts and never answers cost every lookup its timeout and
    redis-py's retries (closed-loop p95 5 s); now one attempt per interval, the other lookups skip it."""
    import socket

    from heimdall_inference.ops.breaker import Breaker

    server = None
    if url == "hang":
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # accepts (the kernel completes the handshake) and never answers
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    clock = _Clock()
    c = FixCache(url, breaker=Breaker("cache", base_s=5.0, max_s=60.0, clock=clock))
    try:
        for _ in range(50):
            assert c.get_many("1", ["a", "b"]) == [None, None]
        assert (c.errors, c.skipped) == (1, 49)
        clock.now = 5.0  # the interval passed: one more try, which fails, and the next interval is 10 s
        c.get("1", "a")
        clock.now = 14.0
        c.get("1", "a")
        assert (c.errors, c.skipped) == (2, 50)
        clock.now = 15.0
        c.get("1", "a")
        assert c.errors == 3
    finally:
        c.close()
        if server is not None:
            server.close()


def test_the_cache_comes_back_after_an_outage(cache):
    from heimdall_inference.ops.breaker import Breaker

    clock = _Clock()
    cache.breaker = Breaker("cache", base_s=5.0, clock=clock)
    cache.breaker.failure(ConnectionError("down"))
    assert cache.get("1", "k") is None and cache.skipped == 1
    cache.put("1", "k", {"x": 1})  # skipped too
    clock.now = 5.0
    assert cache.get("1", "k") is None and cache.skipped == 2 - 0  # the trial went through: a real miss
    cache.put("1", "k", {"x": 2})
    assert cache.get("1", "k") == {"x": 2} and not cache.breaker.is_open
