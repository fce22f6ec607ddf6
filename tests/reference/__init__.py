"""Frozen copies of the pipeline's stages as they were before the fast paths (docs/performance.md), kept as the
reference the parity tests (tests/core/test_parity.py) compare the fast paths with: the same fixes, the same
errors."""
