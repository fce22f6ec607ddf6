"""Benchmarks (tooling: never imported by a worker): the in-process pipeline on one core
(:mod:`.inprocess`), the service over real servers with ratios measured in one run
(:mod:`.service`), and CPU time per process group (:mod:`.cpu_meter`)."""
