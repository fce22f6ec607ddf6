"""The lab (tooling: never imported by a worker): the RF scene simulator (:mod:`.simulator`), the
training observations made through the worker's own wire quantisation and feature plan
(:mod:`.dataset`), the evaluation against the grid posterior and the Cramér-Rao bound
(:mod:`.evaluation`), and the reproducible training script (:mod:`.training`, needs torch)."""
