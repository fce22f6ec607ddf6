"""/healthz of a worker: live children and a connected consumer (a real worker is in test_metrics)."""

from __future__ import annotations

from types import SimpleNamespace

from heimdall_inference.ops.health import worker_health


def _worker(children: int, connected: bool | None):
    conn = None if connected is None else SimpleNamespace(connected=connected)
    return SimpleNamespace(pool=SimpleNamespace(info={"processes": list(range(children))}),
                           consumer=SimpleNamespace(connection=conn))


def test_ok_needs_children_and_a_broker_connection():
    assert worker_health(_worker(2, True))["status"] == "ok"
    assert worker_health(_worker(0, True))["status"] == "unhealthy"
    assert worker_health(_worker(2, False)) | {"pid": 0} == {"status": "unhealthy", "children": 2,
                                                             "broker_connected": False, "pid": 0}
    assert worker_health(_worker(2, None))["broker_connected"] is False
    assert worker_health(SimpleNamespace())["status"] == "unhealthy"  # a worker still starting
