"""A 3-node RabbitMQ cluster (three local nodes of the test's own): the quorum work queue is replicated
on all three; the node the worker and the producer are connected to stops under load; both fail over to
the next URL of the list, and every payload is stored exactly once."""

from __future__ import annotations

import time

import pytest

from ..live import isolated_worker, report_line
from ..servers import PrivateRabbit
from .accounting import Burst, assert_each_stored_once, count_fixes, wait_until


@pytest.fixture()
def cluster():
    nodes: list[PrivateRabbit] = []
    try:
        for _ in range(3):
            nodes.append(PrivateRabbit())
        for n in nodes[1:]:
            n.join(nodes[0])
        yield nodes
    finally:
        for n in nodes:
            n.close()


def test_a_node_of_a_three_node_cluster_stops_under_load(tmp_path, scenes_and_payloads, cluster):
    urls = ";".join(n.url() for n in cluster)  # what a deployment puts in HEIMDALL_BROKER_URL
    with isolated_worker("cluster", tmp_path / "w.log", concurrency=2, broker_url=urls,
                         stop_timeout_s=30) as (_, store, worker):
        members = cluster[0].ctl("list_queues", "name", "type", "members")
        lines = {line.split()[0]: line for line in members.splitlines() if line.startswith("heimdall.")}
        for queue in ("heimdall.predict", "heimdall.batch"):  # both work queues replicated on every node
            assert queue in lines and "quorum" in lines[queue], members
            assert all(n.node in lines[queue] for n in cluster), members
        with Burst(scenes_and_payloads[1][:40], "cluster", rate_per_s=40, count=400) as burst:
            assert wait_until(lambda: count_fixes(store) >= 40, 60, 0.1)
            t0 = time.monotonic()
            cluster[0].stop()  # the first URL: the node both the worker and the producer use
            burst.join()
        assert not burst.errors, burst.errors[:3]
        figures = assert_each_stored_once(store, burst.sent, timeout_s=180)
        assert worker.proc.poll() is None
        report_line(f"fault 3-node cluster, the connected node stopped mid-burst (the burst ended "
                    f"{time.monotonic() - t0:.0f} s later): {figures}")
