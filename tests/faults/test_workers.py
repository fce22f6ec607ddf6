"""Workers die under load: kill -9 of a child or of the main process, SIGTERM mid-burst, and a poison
message that kills its child every time. Every payload is stored once; the poison ends alone in
heimdall.dead after the delivery limit."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from heimdall_inference.worker.process import WorkerProcess

from ..live import isolated_worker, report_line
from .accounting import Burst, assert_each_stored_once, children_of, wait_until


def _log_has(worker, text: str) -> bool:
    return text in Path(worker.log_path).read_text(errors="replace")


@pytest.mark.parametrize("victim", ["child", "main"])
def test_kill_9_mid_burst_loses_and_duplicates_nothing(tmp_path, scenes_and_payloads, victim):
    with isolated_worker(f"kill{victim}", tmp_path / "w.log", concurrency=2, batch_max=16,
                         stop_timeout_s=20) as (settings, store, worker):
        burst = Burst(scenes_and_payloads[1][:40], f"kill-{victim}", rate_per_s=80, count=400).start()
        assert wait_until(lambda: store.count_fixes() >= 40, 60, 0.1)
        if victim == "child":
            os.kill(children_of(worker.proc.pid)[0], signal.SIGKILL)
        else:
            for pid in [*children_of(worker.proc.pid), worker.proc.pid]:  # the whole worker, as an OOM kill would
                os.kill(pid, signal.SIGKILL)
            worker.proc.wait(10)
            worker = WorkerProcess(settings, tmp_path / "w2.log", concurrency=2)  # what a supervisor does
            worker.wait_ready()
        burst.join()
        try:
            assert not burst.errors
            figures = assert_each_stored_once(store, burst.sent, timeout_s=120)
        finally:
            if victim == "main":
                worker.stop()
        report_line(f"fault kill -9 {victim} mid-burst: {figures}")


def _sigterm_mid_burst(tmp_path, docs, tag: str, **worker_options) -> tuple[float, dict, int, WorkerProcess, int]:
    """SIGTERM to a worker in a 200/s burst of 400, then a second worker takes what is left: (seconds the first
    took to stop, the accounting, fixes the first stored, the first worker, its exit code)."""
    with isolated_worker(tag, tmp_path / "w.log", concurrency=2, batch_max=16, **worker_options) as (
            settings, store, worker):
        burst = Burst(docs[:40], tag, rate_per_s=200, count=400).start()
        assert wait_until(lambda: store.count_fixes() >= 40, 60, 0.1)
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = worker.proc.wait(60)
        stop_s = time.monotonic() - t0
        burst.join()
        assert not burst.errors
        done_by_first = store.count_fixes()
        second = WorkerProcess(settings, tmp_path / "w2.log", concurrency=2)
        try:
            second.wait_ready()
            figures = assert_each_stored_once(store, burst.sent, timeout_s=120)
        finally:
            second.stop()
    return stop_s, figures, done_by_first, worker, code


def test_sigterm_mid_burst_finishes_what_runs_and_the_next_worker_takes_the_rest(tmp_path, scenes_and_payloads):
    stop_s, figures, done_by_first, _, code = _sigterm_mid_burst(tmp_path, scenes_and_payloads[1], "sigterm")
    assert code == 0  # a warm shutdown, not a crash
    report_line(f"fault SIGTERM mid-burst: warm shutdown in {stop_s:.1f} s, {figures}, {done_by_first} by the "
                "first worker")


def test_a_message_that_kills_its_child_every_time_ends_alone_in_heimdall_dead(tmp_path, scenes_and_payloads):
    """A poison task (test-only, tests/faults/poison.py) SIGKILLs the child that runs it. Redelivered until
    the delivery limit, it is dead-lettered alone; the valid payloads around it are stored once each."""
    from heimdall_inference.worker.tasks import predict
    from heimdall_inference.worker.topology import dead_queue

    with isolated_worker("poison", tmp_path / "w.log", concurrency=2, delivery_limit=3, stop_timeout_s=20,
                         extra_env={"CELERY_CONFIG_MODULE": "tests.faults.poison"}) as (_, store, worker):
        app = predict.app
        burst = Burst(scenes_and_payloads[1][:40], "poison", rate_per_s=100, count=120).start()
        poison = app.send_task("heimdall.test.poison", ignore_result=True)
        burst.join()
        assert not burst.errors
        figures = assert_each_stored_once(store, burst.sent, timeout_s=120)

        def dead_letters() -> int:
            with app.connection_for_write() as conn:
                return dead_queue()(conn.default_channel).queue_declare(passive=True)[1]

        assert wait_until(lambda: dead_letters() >= 1, 90), worker.log()
        with app.connection_for_write() as conn:
            msg = conn.default_channel.basic_get("heimdall.dead", no_ack=True)
        assert msg.headers["id"] == poison.id and dead_letters() == 0
        deaths = Path(worker.log_path).read_text(errors="replace").count("exited with 'signal 9 (SIGKILL)'")
        assert deaths >= 3, "the poison did not kill its child every time"
        assert worker.proc.poll() is None
        report_line(f"fault poison message: dead-lettered alone after {deaths} child deaths; neighbours {figures}")


def test_a_soft_shutdown_under_load_is_bounded_and_loses_nothing(tmp_path, scenes_and_payloads):
    """SIGTERM remapped to Celery's cold shutdown with a soft shutdown first (as the image runs): the worker
    stops within the soft timeout plus a little, whatever runs; every payload is stored once."""
    stop_s, figures, done_by_first, worker, _ = _sigterm_mid_burst(
        tmp_path, scenes_and_payloads[1], "softstop", shutdown_timeout_s=5.0, extra_env={"REMAP_SIGTERM": "SIGQUIT"})
    assert stop_s < 5.0 + 10.0, stop_s  # the soft timeout, then the cold path's own few seconds
    # the SIGTERM went the cold way (remapped); the soft wait runs only if a task was running at that instant
    assert _log_has(worker, "Cold shutdown") and not _log_has(worker, "Warm shutdown")
    waited = _log_has(worker, "Initiating Soft Shutdown")
    report_line(f"fault soft shutdown (SIGTERM as SIGQUIT, 5 s) mid-burst: stopped in {stop_s:.1f} s "
                f"({'after a soft wait' if waited else 'no task running: cold at once'}), {figures}, "
                f"{done_by_first} by the first worker")
