"""The package's public surface is what ``__all__`` says."""

from __future__ import annotations

import heimdall_inference


def test_all_is_exported_and_complete():
    for name in heimdall_inference.__all__:
        assert hasattr(heimdall_inference, name), name
    public = {n for n in vars(heimdall_inference) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(heimdall_inference.__all__)
