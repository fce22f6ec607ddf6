"""Where the machine's CPU goes during a benchmark phase, by process group.

On a machine where the producer, the broker, the result backend, the database and the workers
share the same cores, throughput ratios are bounded by whoever burns the CPU. :class:`CpuMeter`
snapshots the CPU time (user + system) of every process it can see with psutil and attributes
the difference to a group: this process (the producer), the worker's main process, its children,
RabbitMQ, Redis, PostgreSQL, S3 (moto), or "other". Divided by the tasks of a phase it gives the
CPU milliseconds each group spends per task.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

__all__ = ["CpuMeter", "CpuSample", "classify"]

_SERVERS = (("rabbitmq", ("beam.smp", "erl_child_setup", "epmd", "inet_gethost")),
            ("redis", ("redis-server",)),
            ("postgres", ("postgres", "postmaster")),
            ("s3", ("moto_server", "moto.server")))


def classify(pid: int, name: str, cmdline: str, ppid: int, *, producer_pid: int, worker_pid: int | None) -> str:
    """The group a process belongs to (see the module docstring)."""
    if pid == producer_pid:
        return "producer"
    if worker_pid is not None:
        if pid == worker_pid:
            return "worker_main"
        if ppid == worker_pid:
            return "worker_children"
    text = f"{name} {cmdline}"
    for group, needles in _SERVERS:
        if any(n in text for n in needles):
            return group
    return "other"


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds by (group, pid) at one instant."""

    wall_s: float
    by_pid: dict[tuple[str, int], float]


class CpuMeter:
    """Snapshot and difference the CPU time of this machine's processes, by group."""

    def __init__(self, worker_pid: int | None = None) -> None:
        self.worker_pid = worker_pid
        self.producer_pid = os.getpid()

    def sample(self) -> CpuSample:
        out: dict[tuple[str, int], float] = {}
        for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "cpu_times"]):
            info = p.info
            times = info.get("cpu_times")
            if times is None:  # vanished or not ours to read
                continue
            group = classify(info["pid"], info.get("name") or "", " ".join(info.get("cmdline") or []),
                             info.get("ppid") or 0, producer_pid=self.producer_pid, worker_pid=self.worker_pid)
            out[(group, info["pid"])] = times.user + times.system
        return CpuSample(time.perf_counter(), out)

    @staticmethod
    def per_task(before: CpuSample, after: CpuSample, tasks: int) -> dict[str, Any]:
        """CPU ms per task by group, their total, and how many cores were busy on average."""
        groups: dict[str, float] = {}
        for key, t in after.by_pid.items():
            # a process that started during the phase counts from zero
            groups[key[0]] = groups.get(key[0], 0.0) + max(0.0, t - before.by_pid.get(key, 0.0))
        wall = max(1e-9, after.wall_s - before.wall_s)
        n = max(1, tasks)
        return {"cpu_ms_per_task": {g: round(s * 1e3 / n, 3) for g, s in sorted(groups.items(), key=lambda x: -x[1])},
                "total_cpu_ms_per_task": round(sum(groups.values()) * 1e3 / n, 3),
                "cores_busy": round(sum(groups.values()) / wall, 3)}
