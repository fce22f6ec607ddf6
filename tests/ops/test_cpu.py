"""One native thread per worker process: numpy's OpenBLAS would start one per core (ops/cpu.py)."""

from __future__ import annotations

import subprocess
import sys


def test_every_native_thread_pool_is_limited_to_one_thread():
    """In a fresh interpreter (the limit is process-wide): numpy's BLAS starts with a pool of its own, and after the
    call every pool threadpoolctl sees runs one thread."""
    code = ("import numpy as np; from threadpoolctl import threadpool_info; "
            "from heimdall_inference.ops.cpu import one_thread_per_process; "
            "before = one_thread_per_process(); after = [i['num_threads'] for i in threadpool_info()]; "
            "print(before, after); assert before and set(after) == {1}, (before, after)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_worker_child_runs_one_blas_thread(live, live_worker):
    """The worker's children (prefork, after fork): model_info runs in one and reports its process' native pools."""
    from heimdall_inference.worker.tasks import model_info

    info = model_info.delay().get(timeout=30)
    assert info["native_threads"] and set(info["native_threads"].values()) == {1}, info.get("native_threads")
