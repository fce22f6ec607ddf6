"""/healthz (liveness: live children) and /readyz (children with a model, the broker, the database) of a worker;
a real worker's probes are in test_metrics."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

from heimdall_inference.ops.health import (CachedCheck, clear_child_ready, mark_child_ready, worker_health,
                                           worker_readiness)


def _worker(children: list[int], connected: bool | None):
    conn = None if connected is None else SimpleNamespace(connected=connected)
    return SimpleNamespace(pool=SimpleNamespace(info={"processes": children}), consumer=SimpleNamespace(connection=conn))


def test_liveness_needs_live_children_not_the_broker():
    """A broker outage is not cured by restarting workers: liveness reports it and stays ok."""
    assert worker_health(_worker([1, 2], True))["status"] == "ok"
    assert worker_health(_worker([], True))["status"] == "unhealthy"
    assert worker_health(_worker([1, 2], False)) | {"pid": 0} == {"status": "ok", "children": 2,
                                                                  "broker_connected": False, "pid": 0}
    assert worker_health(_worker([1], None))["broker_connected"] is False
    assert worker_health(SimpleNamespace())["status"] == "unhealthy"  # a worker still starting


def test_readiness_needs_every_child_with_a_model_the_broker_and_the_database(tmp_path):
    pid = os.getpid()
    ok = lambda: None  # noqa: E731
    assert worker_readiness(_worker([pid], True), tmp_path, ok)["status"] == "unready"  # no marker yet
    mark_child_ready(tmp_path, {"version": "3", "alias": "production"})
    r = worker_readiness(_worker([pid], True), tmp_path, ok)
    assert r["status"] == "ready" and r["models"] == [{"alias": "production", "version": "3"}]
    assert worker_readiness(_worker([pid, pid + 100_000], True), tmp_path, ok)["children_without_model"] == 1
    assert worker_readiness(_worker([pid], False), tmp_path, ok)["status"] == "unready"
    down = worker_readiness(_worker([pid], True), tmp_path, lambda: "PostgreSQL: connection refused")
    assert down["status"] == "unready" and down["database"] == "PostgreSQL: connection refused"
    assert worker_readiness(_worker([], True), tmp_path, ok)["status"] == "unready"
    clear_child_ready(tmp_path)
    assert worker_readiness(_worker([pid], True), tmp_path, ok)["status"] == "unready"


def test_a_cached_check_asks_at_most_once_per_ttl_and_survives_a_raising_check():
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("socket closed")
        return None

    c = CachedCheck(check, ttl_s=0.2)
    assert c() is None and c() is None and len(calls) == 1
    time.sleep(0.25)
    assert c() == "OSError: socket closed"


def test_markers_of_children_that_are_gone_are_dropped(tmp_path):
    """A child killed by a time limit or the OOM killer leaves its marker; a later process with the same pid must
    not read as ready before it loads a model."""
    gone = tmp_path / "child-999999.json"
    gone.write_text('{"version": "1"}')
    worker_readiness(_worker([os.getpid()], True), tmp_path, lambda: None)
    assert not gone.exists()
