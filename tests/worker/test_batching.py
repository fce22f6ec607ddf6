"""Micro-batching across the prefork pool: greedy batches, per-request outcomes, failure isolation."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path

import psutil
import pytest

from heimdall_inference.worker import celery_internals as internals
from heimdall_inference.worker.batching import PoolBatcher


@pytest.fixture(autouse=True)
def celery_worker_state():
    """Celery's reserved requests and shutdown flags, as a worker's main process holds them; restored after."""
    from celery.worker import state

    before = set(state.reserved_requests), state.should_stop, state.should_terminate
    yield state
    state.reserved_requests.clear()
    state.reserved_requests.update(before[0])
    state.should_stop, state.should_terminate = before[1], before[2]


class FakeRequest:
    def __init__(self, name: str, revoked: bool = False) -> None:
        from celery.worker.state import task_reserved

        self.id = name
        self._revoked = revoked
        self.time_limits = (None, None)
        self.task = type("T", (), {"soft_time_limit": None, "time_limit": None})()
        self._type, self._request_dict, self._body = "heimdall.predict", {}, b""
        self._content_type, self._content_encoding = "application/json", "utf-8"
        self.events: list[tuple] = []
        task_reserved(self)  # what Celery's strategy does before on_task_request

    def revoked(self) -> bool:
        return self._revoked

    def on_accepted(self, pid, t):
        self.events.append(("accepted", pid))

    def on_success(self, res):
        self.events.append(("success", res))

    def on_failure(self, exc_info):
        self.events.append(("failure", exc_info))

    def on_timeout(self, soft, timeout):
        self.events.append(("timeout", soft))

    def execute_using_pool(self, pool):
        self.events.append(("alone",))


class FakePool:
    """Holds submitted jobs until the test finishes them (like children that are busy)."""

    def __init__(self) -> None:
        self.jobs: list[dict] = []

    def apply_async(self, fn, args, **callbacks):
        self.jobs.append({"fn": fn, "args": args, "items": args[0], **callbacks})


def test_a_lone_request_goes_at_once_and_requests_gather_while_children_are_busy():
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=3, slots=2)
    reqs = [FakeRequest(f"r{i}") for i in range(8)]
    b.submit(reqs[0])
    assert [len(j["items"]) for j in pool.jobs] == [1]  # no waiting for company
    b.submit(reqs[1])
    assert [len(j["items"]) for j in pool.jobs] == [1, 1]  # both children busy now
    for r in reqs[2:]:
        b.submit(r)
    assert len(pool.jobs) == 2 and len(b.waiting) == 6
    pool.jobs[0]["accept_callback"](123, 0.0)
    pool.jobs[0]["callback"](["fix0"])  # one child is free: it takes up to batch_max
    assert [len(j["items"]) for j in pool.jobs] == [1, 1, 3] and len(b.waiting) == 3
    assert reqs[0].events == [("accepted", 123), ("success", "fix0")]
    pool.jobs[2]["callback"](["a", "b", "c"])
    assert [r.events[-1] for r in reqs[2:5]] == [("success", "a"), ("success", "b"), ("success", "c")]
    assert list(b.sizes) == [1, 1, 3, 3] and b.in_flight == 2


def test_a_batch_that_dies_is_run_again_request_by_request():
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    first, *rest = [FakeRequest(f"r{i}") for i in range(5)]
    b.submit(first)
    for r in rest:
        b.submit(r)
    pool.jobs[0]["error_callback"]("WorkerLostError")  # a lone request fails like a single task
    assert first.events == [("failure", "WorkerLostError")]
    assert len(pool.jobs[1]["items"]) == 4
    pool.jobs[1]["error_callback"]("WorkerLostError")  # a batch: each runs alone, neighbours unharmed
    assert _kinds(pool)[2:] == [f"alone:r{i}" for i in range(1, 5)] and b.in_flight == 4
    for job in pool.jobs[2:]:
        job["callback"]((False, "fix", 0.0))
    assert all(r.events == [("success", (False, "fix", 0.0))] for r in rest) and b.in_flight == 0


def test_time_limits_reach_the_pool_and_a_soft_limit_reaches_every_request():
    """billiard calls the timeout callback with keywords (soft=, timeout=); each request logs its soft limit,
    and a hard limit is left to the error callback that follows it (the batch is then run request by request)."""
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    reqs = [FakeRequest(f"r{i}") for i in range(3)]
    reqs[0].time_limits = (None, 7.5)  # (hard, soft) from the message; the task's defaults fill the rest
    reqs[0].task.time_limit = 30.0
    for r in reqs:
        b.submit(r)
    job = pool.jobs[0]  # r0 alone (the only child was free)
    assert (job["soft_timeout"], job["timeout"]) == (7.5, 30.0)
    job["timeout_callback"](soft=True, timeout=7.5)
    assert reqs[0].events == [("timeout", True)]
    job["callback"](["fix"])
    job = pool.jobs[1]  # r1 and r2, gathered meanwhile
    assert len(job["items"]) == 2 and (job["soft_timeout"], job["timeout"]) == (None, None)
    job["timeout_callback"](soft=True, timeout=20.0)
    job["timeout_callback"](soft=False, timeout=30.0)
    assert reqs[1].events == reqs[2].events == [("timeout", True)]


def test_revoked_requests_are_not_sent():
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    b.submit(FakeRequest("gone", revoked=True))
    assert pool.jobs == [] and not b.waiting


def test_waiting_requests_of_a_lost_connection_are_dropped_as_celery_drops_its_reserved_ones(celery_worker_state):
    """They used to run anyway, beside the copies the broker redelivered (27-37 tasks ran twice per restart)."""
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    reqs = [FakeRequest(f"r{i}") for i in range(6)]
    for r in reqs:
        b.submit(r)
    assert [len(j["items"]) for j in pool.jobs] == [1]  # r0 runs, r1..r5 wait
    # Consumer.on_close: the connection is gone; only the running request stays reserved
    celery_worker_state.reserved_requests.clear()
    celery_worker_state.reserved_requests.add(reqs[0])
    fresh = FakeRequest("redelivered-r1")  # the broker's copy, on the new connection
    b.submit(fresh)
    pool.jobs[0]["callback"](["fix0"])
    assert [r.id for r in _sent(pool)] == ["r0", "redelivered-r1"] and not b.waiting


def test_nothing_new_starts_once_a_shutdown_began(celery_worker_state):
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    reqs = [FakeRequest(f"r{i}") for i in range(3)]
    for r in reqs:
        b.submit(r)
    celery_worker_state.should_stop = 0  # a warm shutdown (exit code 0 is a set flag)
    pool.jobs[0]["callback"](["fix0"])
    assert len(pool.jobs) == 1 and len(b.waiting) == 2  # left unacknowledged: the broker hands them on
    assert all(r.events == [] for r in reqs[1:])


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _kinds(pool: FakePool) -> list[str]:
    """What each pool job is: a live batch (its size) or a lone request (its task id)."""
    return [f"live:{len(j['items'])}" if isinstance(j["items"], list) else f"alone:{j['args'][1]}" for j in pool.jobs]


def test_batch_work_takes_every_free_child_when_no_live_request_came():
    pool, clock = FakePool(), Clock()
    b = PoolBatcher(pool, batch_max=4, slots=2, reserved_for_live=1, live_window_s=2.0, clock=clock)
    chunks = [FakeRequest(f"c{i}") for i in range(3)]
    for c in chunks:
        b.submit_bulk(c)
    assert _kinds(pool) == ["alone:c0", "alone:c1"] and b.bulk_in_flight == 2 and len(b.bulk) == 1
    pool.jobs[0]["accept_callback"](7, 0.0)
    pool.jobs[0]["callback"]((False, "summary0", 0.1))  # the tracer's result goes to the request itself
    assert chunks[0].events == [("accepted", 7), ("success", (False, "summary0", 0.1))]
    assert _kinds(pool)[-1] == "alone:c2" and b.in_flight == 2


def test_a_live_request_never_waits_behind_batch_work():
    """While live requests arrive, batch work leaves one child free; a live request waiting when a child
    finishes goes before any chunk; once live traffic stops, batch work takes every child again."""
    pool, clock = FakePool(), Clock()
    b = PoolBatcher(pool, batch_max=8, slots=2, reserved_for_live=1, live_window_s=2.0, clock=clock)
    b.submit(FakeRequest("live0"))
    pool.jobs[0]["callback"](["fix"])  # the live request ran at once; live traffic is now recent
    for i in range(4):
        b.submit_bulk(FakeRequest(f"c{i}"))
    assert _kinds(pool)[1:] == ["alone:c0"]  # one child runs a chunk, one stays free for live
    b.submit(FakeRequest("live1"))
    assert _kinds(pool)[-1] == "live:1"  # it found the free child at once
    b.submit(FakeRequest("live2"))
    b.submit(FakeRequest("live3"))  # both children busy: they wait, ahead of the chunks
    pool.jobs[1]["error_callback"]("WorkerLostError")  # the chunk's child died: Celery's own failure path
    assert _kinds(pool)[-1] == "live:2"
    pool.jobs[2]["callback"](["f1"])
    pool.jobs[3]["callback"](["f2", "f3"])  # no live request waits: one chunk again, the other child free
    assert _kinds(pool)[4:] == ["alone:c1"] and b.bulk_in_flight == 1
    clock.now += 2.5  # no live request for longer than the window
    pool.jobs[4]["callback"]((False, "s1", 0.1))
    assert _kinds(pool)[5:] == ["alone:c2", "alone:c3"] and b.bulk_in_flight == 2


def test_one_child_still_runs_batch_work_beside_live_traffic():
    pool, clock = FakePool(), Clock()
    b = PoolBatcher(pool, batch_max=8, slots=1, reserved_for_live=1, clock=clock)
    b.submit(FakeRequest("live0"))
    b.submit_bulk(FakeRequest("c0"))
    pool.jobs[0]["callback"](["fix"])
    assert _kinds(pool) == ["live:1", "alone:c0"]


def test_batch_max_one_runs_each_live_request_alone():
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=1, slots=1)
    for i in range(3):
        b.submit(FakeRequest(f"r{i}"))
    pool.jobs[0]["callback"]((False, "fix0", 0.0))
    assert _kinds(pool) == ["alone:r0", "alone:r1"] and list(b.sizes) == [1, 1]


def test_batch_work_of_a_lost_connection_or_a_shutdown_is_not_started(celery_worker_state):
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=1)
    chunks = [FakeRequest(f"c{i}") for i in range(3)]
    for c in chunks:
        b.submit_bulk(c)
    celery_worker_state.reserved_requests.discard(chunks[1])  # dropped with its connection
    pool.jobs[0]["callback"]((False, "s0", 0.0))
    assert _kinds(pool) == ["alone:c0", "alone:c2"]
    b.submit_bulk(FakeRequest("c3"))
    celery_worker_state.should_stop = 0
    pool.jobs[1]["callback"]((False, "s2", 0.0))
    assert len(pool.jobs) == 2 and len(b.bulk) == 1


def test_jobs_the_pool_dropped_with_a_lost_connection_are_taken_off_the_count():
    """billiard discards the jobs no child accepted when the connection is lost, without a callback: the
    scheduler, which outlives the consumer, used to count them busy for good (after a few reconnects it ran nothing)."""
    pool = FakePool()
    b = PoolBatcher(pool, batch_max=4, slots=2)
    b.submit(FakeRequest("accepted"))
    b.submit_bulk(FakeRequest("dropped"))
    pool.jobs[0]["accept_callback"](11, 0.0)
    assert b.in_flight == 2 and b.forget_unaccepted() == 1 and (b.in_flight, b.bulk_in_flight) == (1, 0)
    pool.jobs[1]["callback"]((False, "late", 0.0))  # a late answer for the dropped job changes nothing
    assert b.in_flight == 1
    pool.jobs[0]["callback"](["fix"])
    assert b.in_flight == 0 and b.forget_unaccepted() == 0


def test_batch_work_is_never_starved_by_sustained_live_load():
    pool, clock = FakePool(), Clock()
    b = PoolBatcher(pool, batch_max=1, slots=1, reserved_for_live=1, bulk_max_wait_s=5.0, clock=clock)
    b.submit(FakeRequest("live0"))
    b.submit_bulk(FakeRequest("chunk"))
    for i in range(1, 4):  # live requests keep arriving: each goes first while the chunk is young
        b.submit(FakeRequest(f"live{i}"))
        pool.jobs[-1]["callback"]((False, "fix", 0.0))
    assert "alone:chunk" not in _kinds(pool)
    clock.now += 6.0
    b.submit(FakeRequest("live9"))
    pool.jobs[-1]["callback"]((False, "fix", 0.0))
    assert _kinds(pool)[-1] == "alone:chunk"  # it waited too long: it takes the next free child


def test_the_live_and_batch_strategies_share_one_scheduler_per_pool():
    from heimdall_inference.settings import Settings
    from heimdall_inference.worker.batching import scheduler_for

    pool, other = FakePool(), FakePool()
    s = Settings(live_reserved_children=1, live_window_s=0.5, batch_max=16)
    first = scheduler_for(pool, s, app=None)
    assert scheduler_for(pool, s, app=None) is first and scheduler_for(other, s, app=None) is not first
    assert (first.batch_max, first.reserved_for_live, first.live_window_s) == (16, 1, 0.5)


def _sent(pool: FakePool) -> list:
    """The requests sent to the pool, in order (their tracer arguments carry the task id)."""
    class _Id:
        def __init__(self, item):
            self.id = item[1]
    return [_Id(item) for job in pool.jobs for item in job["items"]]


@pytest.mark.integration
def test_a_burst_is_micro_batched_by_a_prefork_worker(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    with isolated_worker("pbatch", tmp_path / "w.log", concurrency=1, batch_max=8) as (_, store, _worker):
        docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:40]]
        bad = copy.deepcopy(docs[5])
        bad["receivers"] = bad["receivers"][:2]
        bad["request_id"] = "too-few"
        docs.append(bad)
        results = [submit(d) for d in docs]
        fixes = [r.get(timeout=60) for r in results[:-1]]
        with pytest.raises(Exception) as err:
            results[-1].get(timeout=60)
        assert getattr(err.value, "code", None) == "too_few_receivers"
        # a client's typed error travels without the pipeline's frames (tasks.bare): the tracer's and the task's
        assert "tasks.py" in results[-1].traceback and "payload.py" not in results[-1].traceback
        assert [f["request_id"] for f in fixes] == [d["request_id"] for d in docs[:-1]]
        assert all(f["task_id"] == r.id for f, r in zip(fixes, results))
        sizes = [f["batch_size"] for f in fixes]
        assert max(sizes) > 1 and max(sizes) <= 8  # one child, a burst: it must have batched
        assert store.count_fixes() == 40 and store.count_rejections() == 1
        # the pool's pipes (its queues to and from the child) were grown to 1 MiB (celery_internals.PoolPipes)
        from .test_pool_pipes import pipe_sizes

        (child,) = psutil.Process(_worker.proc.pid).children()
        assert pipe_sizes(child.pid).count(internals.POOL_PIPE_BYTES) >= 2


@pytest.mark.integration
def test_killing_a_child_under_batched_load_loses_nothing(tmp_path, scenes_and_payloads):
    from heimdall_inference.client import submit

    from ..live import isolated_worker

    with isolated_worker("pkill", tmp_path / "w.log", concurrency=2, batch_max=16) as (_, store, worker):
        docs = []
        for k in range(3):  # 3 x 48 payloads with distinct request ids
            for d in scenes_and_payloads[1][:48]:
                d = copy.deepcopy(d)
                d["request_id"] = f"{d['request_id']}-{k}"
                docs.append(d)
        results = [submit(d) for d in docs]
        results[8].get(timeout=60)  # work is under way: kill a child in the middle of it
        children = [int(p) for p in Path(f"/proc/{worker.proc.pid}/task/{worker.proc.pid}/children").read_text().split()]
        os.kill(children[0], signal.SIGKILL)
        fixes = [r.get(timeout=120) for r in results]
        assert sorted(f["request_id"] for f in fixes) == sorted(d["request_id"] for d in docs)
        assert store.count_fixes() == len(docs)
