"""Operations: what an operator scrapes and probes. Metrics recorded in each worker child
(:mod:`.metrics`), the per-worker HTTP exporter in the main process (:mod:`.exporter`), and the
worker's health check (:mod:`.health`)."""
