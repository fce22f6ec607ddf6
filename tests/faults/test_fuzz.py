"""10,000 fuzzed payloads through a real worker, valid ones interleaved and 20 MB ones among them: the
worker survives, each payload is exactly one fix row, one rejection row or one dead letter, and memory
stays flat (a child used to grow from 142 MB to 1.48 GB on 32 rejected 20 MB payloads)."""

from __future__ import annotations

import collections
import statistics
import time

import psutil

from heimdall_inference.client import submit

from ..live import isolated_worker, report_line
from .accounting import _query, children_of, wait_until
from .fuzz import fuzzed

COUNT = 10_000
WARM_UP = 2_000


def _accounted(store) -> collections.Counter:
    rows = _query(store, f"SELECT task_id FROM {store.schema}.predictions UNION ALL "
                         f"SELECT task_id FROM {store.schema}.rejections")
    return collections.Counter(r[0] for r in rows)


def _rss_mib(pids: list[int]) -> dict[int, float]:
    return {p: psutil.Process(p).memory_info().rss / 2**20 for p in pids}


def test_ten_thousand_fuzzed_payloads_each_accounted_for_once_and_memory_flat(tmp_path, scenes_and_payloads):
    from heimdall_inference.worker.topology import dead_queue

    with isolated_worker("fuzz", tmp_path / "w.log", concurrency=2, batch_max=32, prefetch_multiplier=16,
                         max_payload_bytes=24 * 2**20, stop_timeout_s=60) as (_, store, worker):
        from heimdall_inference.worker.celery_app import app
        kinds: dict[str, str] = {}
        samples: list[dict[int, float]] = []  #: RSS of each process (children and main), every 500 payloads
        for i, (kind, doc) in enumerate(fuzzed(scenes_and_payloads[1][:40], COUNT, seed=2026, tag="fz")):
            kinds[submit(doc).id] = kind
            if i == WARM_UP:
                assert wait_until(lambda: sum(_accounted(store).values()) >= WARM_UP, 300, 0.5)
                pids = [*children_of(worker.proc.pid), worker.proc.pid]
            if i >= WARM_UP and i % 500 == 0:
                samples.append(_rss_mib(pids))
            if kind == "huge":
                time.sleep(0.05)

        def done() -> bool:
            return sum(_accounted(store).values()) + _dead_count(app, dead_queue) >= COUNT

        assert wait_until(done, 600, 1.0), f"{sum(_accounted(store).values())} of {COUNT} accounted for"
        time.sleep(2)
        seen = _accounted(store)
        dead = _dead_ids(app)
        for tid in dead:
            seen[tid] += 1
        assert set(seen) == set(kinds), f"{len(set(kinds) - set(seen))} payloads unaccounted for"
        twice = [t for t, n in seen.items() if n != 1]
        assert not twice, f"{len(twice)} payloads accounted for more than once"
        by_kind = collections.Counter(kinds.values())
        fixes = {r[0] for r in _query(store, f"SELECT task_id FROM {store.schema}.predictions")}
        assert all(kinds[t] != "huge" for t in fixes) and all(t in fixes for t, k in kinds.items() if k == "valid")
        assert worker.proc.poll() is None and "Unrecoverable error" not in worker.log_path.read_text(errors="replace")
        assert [*children_of(worker.proc.pid), worker.proc.pid] == pids, "a child died or was recycled"
        samples.append(_rss_mib(pids))
        codes = collections.Counter(r[0] for r in _query(store, f"SELECT code FROM {store.schema}.rejections"))
        # flat: a process' typical RSS (the median) over the second half of the samples within 10 % (or 160 MiB) of
        # the first half's. A sample may catch a child holding the 20 MB message it is refusing (+40 MB for a moment);
        # the leak this replays grew a child by ~40 MB per such message (25 of them: ~1 GB) and never gave it back.
        # The allowance in MiB is for a child's heap settling over the run (the ONNX arena and the pipeline's buffers
        # reaching the largest micro-batch, the allocator's fragmentation under payloads of every size): children
        # start at ~200 MiB and were seen at 260-333 MiB at the end. Before failures stopped carrying their frames'
        # code positions (celery_internals.compact_tracebacks) they ran at 383-503 MiB from the start, where the
        # same settling did not show as growth.
        half = len(samples) // 2
        first = {p: statistics.median(s[p] for s in samples[:half]) for p in pids}
        growth = {p: statistics.median(s[p] for s in samples[half:]) / first[p] for p in pids}
        report_line(f"fault fuzz: {dict(by_kind)} -> {len(fixes)} fix rows, {sum(codes.values())} rejection rows, "
                    f"{len(dead)} dead letters, 0 lost, 0 twice; RSS MiB after {WARM_UP} -> end, children then main: "
                    f"{[f'{samples[0][p]:.0f} -> {samples[-1][p]:.0f} (x{growth[p]:.2f})' for p in pids]}, max "
                    f"{max(max(s.values()) for s in samples):.0f}; series {[[round(s[p]) for s in samples] for p in pids]}; codes {dict(codes.most_common())}")
        for pid, g in growth.items():
            assert g <= 1.10 or (g - 1) * first[pid] <= 160, \
                f"process {pid} grew by {100 * (g - 1):.0f} %: {[round(s[pid]) for s in samples]}"


def _dead_ids(app) -> list[str]:
    out = []
    with app.connection_for_write() as conn:
        ch = conn.default_channel
        while (m := ch.basic_get("heimdall.dead", no_ack=True)) is not None:
            out.append(m.headers.get("id"))
    return out


def _dead_count(app, dead_queue) -> int:
    with app.connection_for_write() as conn:
        return dead_queue()(conn.default_channel).queue_declare(passive=True)[1]
