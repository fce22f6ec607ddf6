"""Fixtures for the worker package's tests."""

from __future__ import annotations

import pytest

from heimdall_inference.worker import context


class Closable:
    """Stands in for a service or an exporter: counts close()/stop() calls."""

    def __init__(self) -> None:
        self.closed = 0

    def close(self, keep=None) -> None:
        self.closed += 1

    def stop(self) -> None:
        self.closed += 1


@pytest.fixture()
def clean_context():
    """No process context during the test; the previous one is put back after."""
    before = context._holder.context
    context._holder.context = None
    yield
    context._holder.context = before
