"""The fault suite: every test here runs servers of its own (tests/servers.py) and counts every payload."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
