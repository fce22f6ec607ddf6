"""The package's public surface is what ``__all__`` says, and the surface users rely on keeps working."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import heimdall_inference


def test_all_is_exported_and_complete():
    for name in heimdall_inference.__all__:
        assert hasattr(heimdall_inference, name), name
    public = {n for n in vars(heimdall_inference) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(heimdall_inference.__all__)


def _modules() -> list[str]:
    skip = ("heimdall_inference.lab.training", "heimdall_inference.__main__")  # torch; runs the CLI on import
    return [m.name for m in pkgutil.walk_packages(heimdall_inference.__path__, "heimdall_inference.")
            if m.name not in skip]


@pytest.mark.parametrize("name", _modules())
def test_every_module_declares_what_it_exports(name):
    mod = importlib.import_module(name)
    exported = getattr(mod, "__all__", None)
    if exported is None:
        assert mod.__name__.count(".") == 1 and hasattr(mod, "__path__"), f"{name} has no __all__"
        return
    for item in exported:
        assert hasattr(mod, item), f"{name}.__all__ names {item}, which it does not define"


def test_the_documented_entry_points_keep_working():
    from heimdall_inference import Localizer, PayloadError  # noqa: F401
    from heimdall_inference.client import predict, predict_batch, submit
    from heimdall_inference.worker import app

    assert callable(submit) and callable(predict) and callable(predict_batch)
    app.loader.import_default_modules()  # what a worker does at start
    assert {"heimdall.predict", "heimdall.predict_chunk", "heimdall.predict_batch", "heimdall.model_info"} <= set(app.tasks)
    assert heimdall_inference.core.Localizer is Localizer
