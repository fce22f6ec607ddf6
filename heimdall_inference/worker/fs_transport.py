"""kombu's filesystem transport with atomic publishes, for the embedded default (``heimdallfs://``).

Importing this module registers the ``heimdallfs`` scheme with kombu. Its channel
(:class:`.celery_internals.AtomicFilesystemChannel`) writes each message under a hidden temporary
name and renames it into place, so a consumer never reads a half-written message.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES, filesystem

from .celery_internals import AtomicFilesystemChannel

__all__ = ["Transport", "SCHEME"]

SCHEME = "heimdallfs"


class Transport(filesystem.Transport):
    Channel = AtomicFilesystemChannel
    driver_type = driver_name = SCHEME


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
