"""One core's worth of threads per worker process: the native thread pools (OpenBLAS, OpenMP) run one thread.

A prefork child is sized as one core of work (``--concurrency`` = cores, one ONNX intra-op thread each), but
numpy's OpenBLAS starts a thread per core for any product it finds large enough, such as the feature plan's
mel projection of a micro-batch ([frames of 32 payloads, 512] x [512, 32]). With every child doing the same
the cores are oversubscribed: measured here, that product took 31 us of CPU per fix on two threads for 16 us
of wall time, against 26 us on one, and the service's feature stage cost 0.94 ms of child CPU per fix instead
of 0.1 ms. The worker calls :func:`one_thread_per_process` in its main process (children inherit it) and in
each child; the benchmarks do the same. ``OMP_NUM_THREADS=1`` in the image says it again for libraries loaded
later.
"""

from __future__ import annotations

import logging

__all__ = ["one_thread_per_process"]

log = logging.getLogger(__name__)


def one_thread_per_process() -> dict[str, int]:
    """Limit every native thread pool loaded in this process to one thread; returns {library: threads before}."""
    from threadpoolctl import threadpool_info, threadpool_limits

    before = {f"{i['internal_api']} {i.get('version') or ''}".strip(): int(i["num_threads"]) for i in threadpool_info()}
    threadpool_limits(limits=1)
    return before
