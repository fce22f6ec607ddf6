"""The circuit breaker: skip a dead dependency, try again after a doubling interval, close on success."""

from __future__ import annotations

import threading

import pytest

from heimdall_inference.ops.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_open_half_open_and_closed_with_doubling_intervals():
    clock = Clock()
    b = Breaker("dep", base_s=1.0, max_s=4.0, clock=clock)
    assert b.allow() and not b.is_open
    b.failure(OSError("down"))
    assert b.is_open and not b.allow() and b.skipped == 1
    clock.now += 1.0
    assert b.allow()  # half-open: one trial
    assert not b.allow()  # the others keep skipping while it is in flight
    b.failure()
    clock.now += 1.9
    assert not b.allow()  # now 2 s
    clock.now += 0.1
    assert b.allow()
    b.failure()
    b_intervals = []
    for _ in range(3):
        clock.now += 100
        assert b.allow()
        b.failure()
        b_intervals.append(b._interval_s)
    assert b_intervals == [4.0, 4.0, 4.0]  # capped at max_s
    clock.now += 4.0
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow() and b.allow()
    assert b.failures == 6


def test_only_one_trial_among_many_threads():
    clock = Clock()
    b = Breaker("dep", base_s=1.0, clock=clock)
    b.failure()
    clock.now += 5
    allowed = []
    threads = [threading.Thread(target=lambda: allowed.append(b.allow())) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 1


def test_bad_intervals_are_refused():
    with pytest.raises(ValueError):
        Breaker("x", base_s=0)
    with pytest.raises(ValueError):
        Breaker("x", base_s=5, max_s=1)


def test_a_probe_thread_closes_the_breaker_when_the_dependency_returns():
    import time

    up = threading.Event()
    calls = []

    def probe():
        calls.append(time.monotonic())
        if not up.is_set():
            raise ConnectionError("still down")

    b = Breaker("dep", base_s=0.05, max_s=0.2, probe=probe)
    b.failure(ConnectionError("down"))
    assert not b.allow()  # no inline trials when a probe is set
    deadline = time.monotonic() + 5
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.is_open and len(calls) >= 3 and b.failures >= 3
    up.set()
    while b.is_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not b.is_open and b.allow()
    time.sleep(0.3)
    n = len(calls)
    time.sleep(0.3)
    assert len(calls) == n  # closed: the prober stopped
    b.failure(ConnectionError("down again"))  # a new outage starts a new prober
    while b.is_open and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not b.is_open


def test_a_forked_child_starts_with_a_closed_breaker():
    import os

    b = Breaker("dep", base_s=60)
    b.failure()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave at once
        os.write(w, b"open" if b.is_open else b"closed")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 16) == b"closed" and b.is_open


def test_call_returns_the_value_or_says_why_not():
    from heimdall_inference.ops.breaker import FAILED, SKIPPED

    clock = Clock()
    b = Breaker("dep", base_s=1.0, clock=clock)
    assert b.call(lambda: 7, OSError) == 7

    def down():
        raise OSError("down")

    assert b.call(down, OSError) is FAILED and b.is_open
    assert b.call(lambda: 7, OSError) is SKIPPED
    clock.now += 1.0
    assert b.call(lambda: 8, OSError) == 8 and not b.is_open
    with pytest.raises(ZeroDivisionError):  # not one of the dependency's errors: propagates
        b.call(lambda: 1 / 0, OSError)
