"""The worker says at start which endpoints it uses, and warns about each one that does not answer."""

from __future__ import annotations

import copy
import socket

import pytest

from heimdall_inference.ops.endpoints import check_endpoints, endpoints, probe
from heimdall_inference.settings import Settings


def test_every_endpoint_with_its_password_redacted():
    s = Settings(broker_url="amqp://u:secret1@rmq-a:5672//;amqp://u:secret1@rmq-b:5673//",
                 result_backend="redis://:secret2@redis:6379/0", cache_url="",
                 database_url="postgresql://heimdall:secret3@db/heimdall", s3_endpoint_url="http://minio:9000")
    eps = endpoints(s)
    assert [(e.role, e.host, e.port) for e in eps] == [
        ("broker", "rmq-a", 5672), ("broker", "rmq-b", 5673), ("result backend", "redis", 6379),
        ("database", "db", 5432), ("object store", "minio", 9000)]
    assert not any("secret" in e.url for e in eps)


def test_the_embedded_default_has_nothing_to_reach(tmp_path):
    assert {e.host for e in endpoints(Settings.embedded(tmp_path))} == {None}
    assert set(check_endpoints(Settings.embedded(tmp_path)).values()) == {None}


def test_probe_tells_an_open_port_from_a_dead_or_unresolvable_one():
    from heimdall_inference.ops.endpoints import Endpoint

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert probe(Endpoint("cache", "redis://x", "127.0.0.1", port)) is None
    assert "refused" in probe(Endpoint("cache", "redis://x", "127.0.0.1", port)).lower()
    assert probe(Endpoint("cache", "redis://x", "cache-host.invalid", 6379)) is not None


@pytest.mark.integration
def test_a_worker_with_an_unresolvable_cache_says_so_and_serves_at_full_speed(tmp_path, scenes_and_payloads):
    """With HEIMDALL_CACHE_URL left at a host that does not resolve, every lookup used to try again (bench:
    closed-loop p95 5 s); now the start-up log names it, and the cache is skipped after one failure."""
    from heimdall_inference.client import predict

    from ..live import isolated_worker

    with isolated_worker("endpoints", tmp_path / "w.log", cache_url="redis://cache-host.invalid:6379/1",
                         concurrency=1) as (_, store, worker):
        for i in range(20):
            predict({**copy.deepcopy(scenes_and_payloads[1][i]), "request_id": f"ep-{i}"}, timeout_s=30)
        log = worker.log_path.read_text()
        assert "cache: redis://cache-host.invalid:6379/1 does not answer" in log
        assert "database: postgresql://" in log and "broker: amqp://guest:***@" in log
        # one failed lookup opened the breaker; the other 19 skipped the cache
        assert log.count("prediction cache (Redis) unavailable") == 1
        assert store.count_fixes() == 20
