"""The worker's signal handlers: main process set-up, a child's (or the solo pool's) service, shutdown."""

from __future__ import annotations

import os

import pytest

from heimdall_inference.errors import ConfigError
from heimdall_inference.settings import Settings, process_settings, set_process_settings
from heimdall_inference.worker import lifecycle
from heimdall_inference.worker.context import ProcessContext, current, install

from .conftest import Closable

MEMORY = Settings(database_url="memory://", cache_url="")


def test_the_solo_pool_adds_the_service_to_the_main_context_and_keeps_its_exporter(clean_context, payload):
    """The solo pool sends worker_process_init in the main process: its exporter must survive."""
    exporter = Closable()
    main = ProcessContext(settings=MEMORY, exporter=exporter)
    install(main)
    lifecycle._init_child()
    ctx = current()
    assert ctx is not main and ctx.exporter is exporter and ctx.service is not None and exporter.closed == 0
    assert ctx.service.predict(payload, task_id="solo")["task_id"] == "solo"
    lifecycle._close_child()
    assert exporter.closed == 1 and current() is None


def test_a_forked_child_builds_its_own_context_without_the_parents_exporter(clean_context):
    exporter = Closable()
    install(ProcessContext(settings=MEMORY, exporter=exporter))
    before = process_settings()
    set_process_settings(MEMORY)
    try:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                lifecycle._init_child()
                ctx = current()
                if ctx is None or ctx.service is None:
                    code = 1
                elif ctx.exporter is not None or exporter.closed:
                    code = 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert exporter.closed == 0
    finally:
        set_process_settings(before)
        install(None)


def test_worker_init_leaves_nothing_behind_on_an_untested_celery(clean_context, monkeypatch):
    def refuse():
        raise ConfigError("heimdall-inference uses internals of celery 9.9.9 (tested: 5.7.x)")

    touched = []
    monkeypatch.setattr(lifecycle, "check_versions", refuse)
    monkeypatch.setattr(lifecycle, "_declare_dead_letter_queue", touched.append)
    monkeypatch.setattr(lifecycle, "_start_exporter", lambda *a: touched.append(a))
    lifecycle._init_main(sender=object())
    assert touched == [] and current() is None


@pytest.mark.integration
def test_a_changed_delivery_limit_is_one_clear_error_and_the_worker_still_serves(tmp_path, scenes_and_payloads):
    """A queue argument cannot change: with HEIMDALL_DELIVERY_LIMIT changed, every worker used to fail to
    declare heimdall.predict (PRECONDITION_FAILED) and never start."""
    import copy

    from heimdall_inference.client import predict, predict_batch
    from heimdall_inference.worker.process import WorkerProcess

    from ..live import isolated_worker

    with isolated_worker("qargs", tmp_path / "w.log", concurrency=1, delivery_limit=5) as (settings, store, worker):
        worker.stop()
        changed = WorkerProcess(settings.replace(delivery_limit=7), tmp_path / "w2.log", concurrency=1)
        try:
            changed.wait_ready()
            fix = predict({**copy.deepcopy(scenes_and_payloads[1][0]), "request_id": "qargs"}, timeout_s=30)
            assert fix["request_id"] == "qargs"
            batch = [{**copy.deepcopy(d), "request_id": f"qargs-b{i}"} for i, d in enumerate(scenes_and_payloads[1][:3])]
            assert predict_batch(batch, chunk_size=2, timeout_s=60)["fixes"] == 3  # the batch queue too
            log = changed.log_path.read_text()
            for queue in ("heimdall.predict", "heimdall.batch"):
                assert f"{queue} exists with other arguments than these settings ask for " \
                       "(HEIMDALL_DELIVERY_LIMIT=7)" in log and "set_policy" in log
            assert changed.proc.poll() is None
        finally:
            changed.stop()
