"""Counting every submitted payload: one fix row or one rejection row (or one dead letter), none lost,
none twice."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil


def _query(store, sql: str) -> list:
    """Rows of a query; the test's own pool may hold connections a server restart cut: try again."""
    from heimdall_inference.errors import TransientError

    for attempt in range(20):
        try:
            return store._run(lambda c: c.execute(sql).fetchall())
        except TransientError:
            if attempt == 19:
                raise
            time.sleep(0.5)
    return []


def stored_keys(store) -> list[str]:
    """Every fix row's key (a list: a key stored twice would show twice, though the primary key forbids it)."""
    return [r[0] for r in _query(store, f"SELECT fix_key FROM {store.schema}.predictions")]


def rejected_keys(store) -> list[str]:
    return [r[0] for r in _query(store, f"SELECT coalesce(reject_key, request_id, task_id) FROM {store.schema}.rejections")]


def count_fixes(store) -> int:
    return _query(store, f"SELECT count(*) FROM {store.schema}.predictions")[0][0]


def wait_until(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


@dataclass
class Burst:
    """Publishes payloads (unique request ids) from a thread at a steady rate; remembers what went out."""

    docs: list[dict]
    tag: str
    rate_per_s: float = 40.0
    count: int | None = None  #: stop after this many (None: until stop())
    submit: Callable | None = None
    sent: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    results: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from heimdall_inference.client import submit

        # fire and forget: the test counts rows, and no result subscription outlives the test
        send = self.submit or (lambda d: submit(d, ignore_result=True))
        i = 0
        while not self._stop.is_set() and (self.count is None or i < self.count):
            d = copy.deepcopy(self.docs[i % len(self.docs)])
            d["request_id"] = f"{self.tag}-{i}"
            try:
                self.results.append(send(d))
                self.sent.append(d["request_id"])
            except Exception as exc:
                self.errors.append(exc)
            i += 1
            self._stop.wait(1 / self.rate_per_s)

    def start(self) -> "Burst":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def join(self, timeout_s: float = 300) -> None:
        self._thread.join(timeout_s)

    def __enter__(self) -> "Burst":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def assert_each_stored_once(store, sent: list[str], timeout_s: float = 120) -> dict:
    """Every sent request id is in predictions exactly once (waits for stragglers); returns the figures."""
    want = set(sent)
    assert len(want) == len(sent), "the test sent a request id twice"
    wait_until(lambda: set(stored_keys(store)) >= want, timeout_s)
    keys = stored_keys(store)
    lost = want - set(keys)
    duplicated = len(keys) - len(set(keys))
    assert not lost, f"{len(lost)} of {len(want)} lost, e.g. {sorted(lost)[:5]}"
    assert duplicated == 0
    return {"submitted": len(sent), "stored": len(set(keys) & want), "lost": 0, "duplicated": 0}


def children_of(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children()]
