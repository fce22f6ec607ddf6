"""Real servers for integration tests: an own RabbitMQ vhost, Redis key prefix and PostgreSQL schema.

A server that is not reachable skips its tests on a laptop, and fails them under CI (``CI`` set).
Every resource a test run makes is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import uuid
from dataclasses import dataclass

import pytest

from heimdall_inference.settings import Settings

PG_URL = os.environ.get("HEIMDALL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("HEIMDALL_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
RABBIT_HOST = os.environ.get("HEIMDALL_TEST_RABBIT", "127.0.0.1:5672")


def unavailable(what: str) -> None:
    """Skip on a developer machine without the server; fail in CI, where it must be there."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but not reachable")
    pytest.skip(f"{what} not reachable")


def port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def queue_depths(vhost: str) -> dict[str, int]:
    """Messages (ready + unacknowledged) per queue of a vhost, as RabbitMQ reports them."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "messages", "--no-table-headers"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return {name: int(n) for name, n in (line.split() for line in out.splitlines() if line.strip())}


def wait_for_depths(vhost: str, want: dict[str, int], timeout_s: float = 30.0) -> dict[str, int]:
    """The depths of ``want``'s queues once they read as wanted (RabbitMQ refreshes a quorum queue's figures
    every few seconds), or as they are at the deadline."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        depths = queue_depths(vhost)
        got = {q: depths.get(q) for q in want}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


@dataclass
class LiveServers:
    settings: Settings
    vhost: str
    schema: str
    prefix: str


def make_live(tag: str) -> LiveServers:
    if not port_open(RABBIT_HOST):
        unavailable("RabbitMQ")
    if not port_open(PG_URL.split("@", 1)[1].split("/", 1)[0]):
        unavailable("PostgreSQL")
    if not port_open(REDIS_URL.split("//", 1)[1].split("/", 1)[0]):
        unavailable("Redis")
    uid = uuid.uuid4().hex[:10]
    vhost = f"heimdall-test-{tag}-{uid}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    prefix = f"heimdall-test-{uid}:"
    schema = f"t_{tag}_{uid}"
    s = Settings(broker_url=f"amqp://guest:guest@{RABBIT_HOST}/{vhost}", result_backend=REDIS_URL, cache_url=REDIS_URL,
                 redis_key_prefix=prefix, database_url=PG_URL, db_schema=schema, prefetch_multiplier=4)
    return LiveServers(settings=s, vhost=vhost, schema=schema, prefix=prefix)


def drop_live(live: LiveServers) -> None:
    import redis

    from heimdall_inference.store.postgres import PostgresStore

    try:
        rabbitmqctl("delete_vhost", live.vhost)
    finally:
        r = redis.Redis.from_url(REDIS_URL)
        keys = list(r.scan_iter(f"{live.prefix}*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()
        store = PostgresStore(PG_URL, schema=live.schema)
        store.drop_schema()
        store.close()


@contextlib.contextmanager
def isolated_worker(tag: str, log_path, *, stop_timeout_s: float = 30.0, pool: str = "prefork",
                    concurrency: int = 1, extra_env: dict | None = None, store_url: str | None = None, **overrides):
    """Own vhost/prefix/schema, a worker with ``overrides`` applied to its settings, the producer
    pointed at it; yields (settings, store of the real schema, worker) and removes everything after.

    The store (the test's own view of the tables) uses the worker's database unless ``store_url`` names
    another way to the same one (the worker's may go through a proxy the test opens and closes)."""
    from heimdall_inference.worker.celery_app import configure_app
    from heimdall_inference.worker.process import WorkerProcess
    from heimdall_inference.store import open_store

    servers = make_live(tag)
    settings = servers.settings.replace(**overrides)
    store = open_store(store_url or settings.database_url, schema=settings.db_schema)
    store.init_schema()
    worker = WorkerProcess(settings, log_path, pool=pool, concurrency=concurrency, extra_env=extra_env)
    try:
        worker.wait_ready()
        configure_app(settings)
        yield settings, store, worker
    finally:
        worker.stop(timeout_s=stop_timeout_s)
        configure_app(Settings.from_env())
        store.close()
        drop_live(servers)


REPORT_LINES: list[str] = []
"""Lines the test run prints at its end (pytest_terminal_summary in conftest): e.g. which storage
branch the store tests ran on."""


def report_line(text: str) -> None:
    REPORT_LINES.append(text)
