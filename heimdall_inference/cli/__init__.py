"""The ``heimdall-inference`` command line (tooling: never imported by a worker).

:mod:`.commands` parses and dispatches every sub-command; :mod:`.demo` is the embedded default (a
real worker on a filesystem broker, no servers); :mod:`.plot` draws the map picture (matplotlib).
"""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
