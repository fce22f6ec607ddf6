"""PostgreSQL (a cluster of the test's own) restarts or hangs under load: writes are retried, nothing is
lost, nothing is stored twice, and the worker keeps running."""

from __future__ import annotations

import copy
import time

import pytest

from heimdall_inference.client import submit
from heimdall_inference.errors import PayloadError

from ..live import isolated_worker, report_line
from ..servers import PrivatePostgres
from .accounting import Burst, assert_each_stored_once, count_fixes, rejected_keys, wait_until


@pytest.fixture()
def pg():
    cluster = PrivatePostgres()
    yield cluster
    cluster.close()


def test_a_postgres_restart_under_load_delays_fixes_and_loses_none(tmp_path, scenes_and_payloads, pg):
    with isolated_worker("pgrestart", tmp_path / "w.log", concurrency=2, database_url=pg.url,
                         stop_timeout_s=20) as (_, store, worker):
        with Burst(scenes_and_payloads[1][:40], "pgrestart", rate_per_s=40) as burst:
            assert wait_until(lambda: count_fixes(store) >= 40, 60, 0.1)
            pg.stop("fast")
            bad = [submit({**copy.deepcopy(scenes_and_payloads[1][i]), "request_id": f"pgrestart-bad-{i}",
                           "receivers": scenes_and_payloads[1][i]["receivers"][:2]}) for i in range(10)]
            time.sleep(8)
            pg.start()
            time.sleep(3)
        assert not burst.errors
        figures = assert_each_stored_once(store, burst.sent, timeout_s=180)
        # rejections made while PostgreSQL was down were retried and recorded once each, once it was back
        want = {f"pgrestart-bad-{i}" for i in range(10)}
        assert wait_until(lambda: want <= set(rejected_keys(store)), 120)
        assert sorted(k for k in rejected_keys(store) if k in want) == sorted(want)
        for r in bad:
            with pytest.raises(PayloadError):
                r.get(timeout=60)
        assert worker.proc.poll() is None and "Retry in" in worker.log_path.read_text()
        report_line(f"fault PostgreSQL restart (8 s down): {figures}")


def test_a_hanging_postgres_is_a_time_limit_and_a_retry_not_a_loss(tmp_path, scenes_and_payloads, pg):
    """Every PostgreSQL process stopped (SIGSTOP): connections are accepted and never answered. The soft
    time limit ends the pass, its requests retry, and they are stored once PostgreSQL answers again."""
    with isolated_worker("pghang", tmp_path / "w.log", concurrency=2, database_url=pg.url, stop_timeout_s=30,
                         task_soft_time_limit_s=3.0, task_time_limit_s=12.0) as (_, store, worker):
        with Burst(scenes_and_payloads[1][:40], "pghang", rate_per_s=40) as burst:
            assert wait_until(lambda: count_fixes(store) >= 40, 60, 0.1)
            pg.freeze()
            time.sleep(10)
            pg.thaw()
            time.sleep(3)
        assert not burst.errors
        figures = assert_each_stored_once(store, burst.sent, timeout_s=180)
        log = worker.log_path.read_text(errors="replace").lower()
        assert "soft time limit" in log and worker.proc.poll() is None
        report_line(f"fault PostgreSQL hanging (10 s frozen): {figures}")
