"""A circuit breaker for an optional dependency (the prediction cache, the result backend).

After a failure the breaker opens: callers skip the dependency (``allow()`` is False) for
``base_s``, and for twice as long after each further failure, up to ``max_s``. So an unreachable,
unresolvable or hanging host costs one failed call per interval, not one per request.

Who tries again:

* with a ``probe`` (a cheap call such as Redis' PING), a daemon thread of the breaker calls it once
  per interval while the breaker is open and closes it on the first success: no request ever waits
  on a dead dependency after the first failure, and the dependency is back in use within one
  interval of its return;
* without one, the first caller after the interval is let through as a trial (half-open); its
  success closes the breaker, its failure opens it for the next, longer interval.

Thread-safe; the clock is injectable (tests). Breakers belong to the process that made them: in a
forked child every breaker starts closed again, with no probe thread (threads do not survive a fork).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

__all__ = ["Breaker", "SKIPPED", "FAILED"]

log = logging.getLogger(__name__)

_ALL: "weakref.WeakSet[Breaker]" = weakref.WeakSet()

SKIPPED = object()
"""What :meth:`Breaker.call` returns when the breaker was open and the call was not made."""
FAILED = object()
"""What :meth:`Breaker.call` returns when the call raised one of the dependency's errors."""


class Breaker:
    """Closed (calls go through), open (calls skipped) or half-open (one trial call in flight)."""

    def __init__(self, name: str, *, base_s: float = 5.0, max_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, probe: Callable[[], object] | None = None) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError("need 0 < base_s <= max_s")
        self.name = name
        self.base_s = base_s
        self.max_s = max_s
        self.probe = probe
        self._clock = clock
        self.failures = 0  #: failures seen (each opened the breaker or made its interval longer)
        self.skipped = 0  #: calls refused while open
        self.reset()
        _ALL.add(self)

    def reset(self) -> None:
        """Closed, with no probe thread and a fresh lock (what a forked child starts with)."""
        self._lock = threading.Lock()
        self._interval_s = 0.0  #: 0 while closed
        self._retry_at = 0.0
        self._trial = False  #: a half-open trial call is in flight
        self._prober: threading.Thread | None = None
        self._wake = threading.Event()

    @property
    def is_open(self) -> bool:
        return self._interval_s > 0

    def allow(self) -> bool:
        """May a call go to the dependency now? Counts the refusals."""
        with self._lock:
            if self._interval_s == 0:
                return True
            if self.probe is None and not self._trial and self._clock() >= self._retry_at:
                self._trial = True  # half-open: this caller tries; the others keep skipping
                return True
            self.skipped += 1
            return False

    def call(self, fn: Callable[[], object], errors: type[BaseException] | tuple[type[BaseException], ...]) -> object:
        """``fn()`` through the breaker: its value, :data:`SKIPPED` while open, or :data:`FAILED` when it
        raised one of ``errors`` (which opens the breaker). Any other exception propagates."""
        if not self.allow():
            return SKIPPED
        try:
            out = fn()
        except errors as exc:
            self.failure(exc)
            return FAILED
        except BaseException:
            with self._lock:
                self._trial = False  # not the dependency's fault: a later caller may try again
            raise
        self.success()
        return out

    def success(self) -> None:
        """The call worked: close the breaker."""
        with self._lock:
            was_open, self._interval_s, self._trial = self._interval_s > 0, 0.0, False
        if was_open:
            self._wake.set()
            log.warning("%s answers again", self.name)

    def failure(self, exc: BaseException | None = None) -> None:
        """The call failed: open the breaker for the next interval (doubling up to ``max_s``)."""
        with self._lock:
            was_open = self._interval_s > 0
            self.failures += 1
            self._interval_s = self.base_s if self._interval_s == 0 else min(self.max_s, self._interval_s * 2)
            self._retry_at = self._clock() + self._interval_s
            self._trial = False
            interval = self._interval_s
            start_prober = self.probe is not None and self._prober is None
            if start_prober:
                self._prober = threading.Thread(target=self._probe_loop, name=f"breaker {self.name}", daemon=True)
        if not was_open:
            log.warning("%s unavailable (%s); skipping it for %.0f s", self.name, _one_line(exc), interval)
        if start_prober:
            self._prober.start()  # type: ignore[union-attr]

    def _probe_loop(self) -> None:
        """While open: wait one interval, probe; a success closes the breaker, a failure doubles the interval."""
        while True:
            with self._lock:
                if self._interval_s == 0:
                    self._prober = None  # the next failure starts a new one
                    return
                delay = max(0.0, self._retry_at - self._clock())
            if self._wake.wait(delay):
                self._wake.clear()  # a caller's success: look at the state again
                continue
            try:
                self.probe()  # type: ignore[misc]
            except Exception as exc:  # whatever the dependency raises: still down
                self.failure(exc)
            else:
                self.success()


def _one_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[-1] if text else type(exc).__name__


def _after_fork_in_child() -> None:
    for b in list(_ALL):
        b.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
