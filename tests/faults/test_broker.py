"""RabbitMQ restarts under load (a node of the test's own): producers lose no publish, workers reconnect,
every payload is stored exactly once; a broker that stays down is a clear BrokerUnavailable."""

from __future__ import annotations

import time

import pytest

from heimdall_inference.errors import BrokerUnavailable

from ..live import isolated_worker, report_line
from ..servers import PrivateRabbit
from .accounting import Burst, assert_each_stored_once


@pytest.fixture()
def rabbit():
    node = PrivateRabbit()
    yield node
    node.close()


def test_a_broker_restart_under_load_loses_and_duplicates_nothing(tmp_path, scenes_and_payloads, rabbit):
    """Producers lost 4-8 % of their publishes while the broker restarted ("Connection refused")."""
    with isolated_worker("brestart", tmp_path / "w.log", concurrency=2, broker_url=rabbit.url()) as (_, store, worker):
        burst = Burst(scenes_and_payloads[1][:30], "brestart", rate_per_s=40, count=240).start()
        time.sleep(2)
        t0 = time.monotonic()
        rabbit.stop()
        time.sleep(2)
        rabbit.start()
        down_s = time.monotonic() - t0
        burst.join()
        assert not burst.errors, burst.errors[:3]
        figures = assert_each_stored_once(store, burst.sent, timeout_s=120)
        assert worker.proc.poll() is None, worker.log()
        report_line(f"fault broker restart ({down_s:.0f} s down): {figures}")


def test_a_broker_that_stays_down_is_a_typed_error_not_a_hang(tmp_path, scenes_and_payloads, rabbit):
    import copy

    from heimdall_inference.client import submit
    from heimdall_inference.settings import Settings
    from heimdall_inference.worker.celery_app import configure_app

    app = configure_app(Settings(broker_url=rabbit.url(), result_backend="redis://127.0.0.1:6379/13",
                                 cache_url="", database_url="memory://"))
    try:
        app.conf.task_publish_retry_policy = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2,
                                              "interval_max": 0.2}
        rabbit.stop()
        with pytest.raises(BrokerUnavailable, match="not published"):
            submit(copy.deepcopy(scenes_and_payloads[1][0]), ignore_result=True)
    finally:
        configure_app(Settings.from_env())
