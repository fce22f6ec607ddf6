"""Shared fixtures: the shipped model, a warm localizer and simulated payloads."""

from __future__ import annotations

import numpy as np
import pytest

from heimdall_inference.core.codec import dumps
from heimdall_inference.core.localizer import Localizer
from heimdall_inference.lab.simulator import Scenes, SignalConfig, scene_payloads, simulate


@pytest.fixture(scope="session")
def localizer() -> Localizer:
    """The shipped reference model, warm, as a worker process holds it."""
    return Localizer()


@pytest.fixture(scope="session")
def spec(localizer):
    return localizer.spec


@pytest.fixture(scope="session")
def signal(spec) -> SignalConfig:
    return SignalConfig(sample_rate_hz=spec.sample_rate_hz, snippet_s=spec.snippet_samples / spec.sample_rate_hz,
                        full_scale_dbm=spec.features.full_scale_dbm)


@pytest.fixture(scope="session")
def scenes_and_payloads(spec, signal) -> tuple[Scenes, list[dict]]:
    """40 simulated scenes (3-7 receivers, mixed dtypes) as JSON-ready payload dicts, with truth."""
    scenes, iq = simulate(spec.network, 40, seed=101, signal=signal)
    return scenes, scene_payloads(scenes, iq, spec.network, signal, seed=101)


@pytest.fixture()
def payload(scenes_and_payloads) -> dict:
    """A fresh deep copy of one valid JSON-ready payload (tests may mutate it)."""
    import copy

    return copy.deepcopy(scenes_and_payloads[1][0])


@pytest.fixture()
def payload_bytes(payload) -> bytes:
    return dumps(payload, "json")


def error_km(fix: dict, truth_east_m: float, truth_north_m: float) -> float:
    return float(np.hypot(fix["position"]["east_m"] - truth_east_m, fix["position"]["north_m"] - truth_north_m) / 1e3)


@pytest.fixture()
def live(live_session):
    """The live servers, with this process' Celery app (the producer) pointed at them for the test."""
    from heimdall_inference.worker.celery_app import configure_app

    configure_app(live_session[0].settings)
    return live_session


@pytest.fixture(scope="session")
def live_session(tmp_path_factory):
    """Own vhost, Redis prefix and schema on the real servers, for the whole run."""
    from heimdall_inference.worker.celery_app import configure_app
    from heimdall_inference.settings import Settings
    from heimdall_inference.store import open_store

    from .live import drop_live, make_live

    servers = make_live("svc")
    store = open_store(servers.settings.database_url, schema=servers.schema)
    store.init_schema()
    configure_app(servers.settings)
    try:
        yield servers, store
    finally:
        configure_app(Settings.from_env())
        store.close()
        drop_live(servers)


@pytest.fixture(scope="session")
def live_worker(live_session, tmp_path_factory):
    """A real prefork worker (2 children) on the live servers."""
    from heimdall_inference.worker.process import WorkerProcess

    servers, _ = live_session
    worker = WorkerProcess(servers.settings, tmp_path_factory.mktemp("worker") / "worker.log")
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def pytest_terminal_summary(terminalreporter):
    from .live import REPORT_LINES

    for line in REPORT_LINES:
        terminalreporter.write_line(line)
