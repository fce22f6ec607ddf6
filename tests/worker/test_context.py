"""The process context: built whole, replaced whole, closed by the process that built it."""

from __future__ import annotations

import os

from heimdall_inference.settings import Settings, process_settings, set_process_settings
from heimdall_inference.worker.context import ProcessContext, build_child_context, current, current_service, install

from .conftest import Closable


def test_a_child_context_holds_a_warm_service_from_the_settings(clean_context, payload):
    ctx = build_child_context(Settings(database_url="memory://", cache_url="", onnx_threads=1))
    try:
        assert ctx.pid == os.getpid() and ctx.metrics is None and ctx.exporter is None
        fix = ctx.service.predict(payload, task_id="t1")
        assert fix["schema"] == "heimdall.fix/v1" and ctx.service.store.count_fixes() == 1
    finally:
        ctx.close()


def test_install_replaces_the_whole_context_and_closes_only_what_is_not_shared(clean_context):
    settings = Settings(database_url="memory://", cache_url="")
    service, metrics, exporter = Closable(), object(), Closable()
    first = ProcessContext(settings=settings, service=service, metrics=metrics, exporter=exporter)
    assert install(first) is None and current() is first
    new_service = Closable()
    second = first.with_(service=new_service)  # a model swap: the metrics and the exporter carry over
    assert second.metrics is metrics and second.exporter is exporter
    assert install(second) is first and current() is second
    assert service.closed == 1 and exporter.closed == 0 and new_service.closed == 0
    install(None)
    assert current() is None and new_service.closed == 1 and exporter.closed == 1


def test_a_forked_child_drops_the_parents_context_without_closing_it(clean_context):
    service, exporter = Closable(), Closable()
    install(ProcessContext(settings=Settings(), service=service, exporter=exporter))
    pid = os.fork()
    if pid == 0:  # the child: what worker_process_init does first
        code = 0
        try:
            if current() is not None:  # an inherited context is not this process' context
                code = 1
            install(None)
            if service.closed or exporter.closed:
                code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert current() is not None and service.closed == 0  # the parent's is untouched
    install(None)
    assert service.closed == 1 and exporter.closed == 1


def test_pools_that_do_not_fork_build_the_service_on_first_use(clean_context, payload):
    before = process_settings()
    set_process_settings(Settings(database_url="memory://", cache_url=""))
    try:
        svc = current_service()
        assert current_service() is svc and current().service is svc
        assert svc.predict(payload, task_id="lazy")["task_id"] == "lazy"
    finally:
        install(None)
        set_process_settings(before)


def test_a_context_inherited_from_another_process_cannot_be_extended(clean_context):
    ctx = ProcessContext(settings=Settings(), pid=os.getpid() + 1)
    import pytest

    with pytest.raises(RuntimeError, match="inherited"):
        ctx.with_(service=None)
