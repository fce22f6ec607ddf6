"""Hot swap, piece by piece: the main process' watch and a child's swap between passes."""

from __future__ import annotations

import os
from pathlib import Path

from heimdall_inference.errors import RegistryError, RegistryUnavailable
from heimdall_inference.registry.resolve import ModelSet, ResolvedModel
from heimdall_inference.settings import Settings
from heimdall_inference.worker.context import ProcessContext
from heimdall_inference.worker.model_swap import ModelWatcher, read_state, swapped, write_state


def _model(version: str, sha: str = "a" * 64) -> ResolvedModel:
    return ResolvedModel(path=Path(f"/cache/m/{version}/model.onnx"), source="registry", name="m", version=version,
                         alias="production", sha256=sha, uri="models:/m@production")


def test_the_watch_publishes_new_versions_and_refuses_broken_ones(tmp_path):
    answers = [_model("1"), RegistryUnavailable("down"), RegistryError("sha256 mismatch"), _model("2"),
               {**_model("1").__dict__, "source": "cache"}]
    counted = []

    def resolve(ref=None):
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return ResolvedModel(**a) if isinstance(a, dict) else a

    state = tmp_path / "model.json"
    w = ModelWatcher(ModelSet(_model("1")), state, resolve, interval_s=0, count=counted.append)
    assert read_state(state) == ModelSet(_model("1"))
    # the last answer: the registry down, the cached version served by resolve_model's fallback
    assert [w.check() for _ in range(5)] == ["unchanged", "unreachable", "refused", "published", "unreachable"]
    assert counted == ["unreachable", "refused", "published", "unreachable"]
    assert read_state(state) == ModelSet(_model("2")) == w.current


def test_the_watch_thread_outlives_a_failing_check(tmp_path):
    import time

    calls = []

    def resolve(ref=None):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")  # not a HeimdallError: check() raises it, the thread must go on
        return _model("2")

    (tmp_path / "s").mkdir()
    w = ModelWatcher(ModelSet(_model("1")), tmp_path / "s" / "model.json", resolve, interval_s=0.05).start()
    deadline = time.monotonic() + 10
    while w.current.primary.version != "2" and time.monotonic() < deadline:
        time.sleep(0.05)
    w.stop()
    assert w.current.primary.version == "2" and len(calls) >= 2 and not (tmp_path / "s").exists()


class FakeService:
    def __init__(self, version: str) -> None:
        self.version = version


def test_a_child_swaps_when_the_state_file_changes_and_keeps_the_old_model_when_the_new_one_fails(tmp_path):
    state = tmp_path / "model.json"
    write_state(state, ModelSet(_model("1")))
    st = os.stat(state)
    ctx = ProcessContext(settings=Settings(), service=FakeService("1"), models=ModelSet(_model("1")),
                         model_state=state, model_seen=(st.st_ino, st.st_mtime_ns))
    installed = []
    build = lambda c, m: FakeService(m.primary.version)  # noqa: E731
    assert swapped(ctx, build, installed.append) is ctx and installed == []  # nothing published: one stat
    write_state(state, ModelSet(_model("2")))
    new = swapped(ctx, build, installed.append)
    assert new.service.version == "2" and new.models == ModelSet(_model("2")) and installed == [new]
    assert swapped(new, build, installed.append) is new  # acted on once

    def broken(c, m):
        raise RegistryError("does not load")

    write_state(state, ModelSet(_model("3")))
    kept = swapped(new, broken, installed.append)
    assert kept.service.version == "2" and kept.models == ModelSet(_model("2"))
    assert swapped(kept, broken, installed.append) is kept  # not retried on every pass


def test_an_experiment_arm_appears_and_is_dropped_when_its_alias_is_removed(tmp_path):
    from heimdall_inference.errors import RegistryNotFound

    def arm(version):
        return ResolvedModel(path=Path(f"/cache/m/{version}/model.onnx"), source="registry", name="m",
                             version=version, alias="challenger", sha256="b" * 64, uri="models:/m@challenger")

    answers = {None: [_model("1")] * 4,
               "challenger": [RegistryNotFound("no alias"), arm("7"), RegistryError("sha256 mismatch"),
                              RegistryNotFound("alias removed")]}

    def resolve(ref=None):
        a = answers[ref].pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    counted = []
    w = ModelWatcher(ModelSet(_model("1")), tmp_path / "model.json", resolve, refs=("challenger",), interval_s=0,
                     count=counted.append)
    assert w.check() == "absent" and w.current.other("challenger") is None
    assert w.check() == "published" and read_state(tmp_path / "model.json").other("challenger") == arm("7")
    assert w.check() == "refused" and w.current.other("challenger") == arm("7")  # a bad new version: the old serves
    assert w.check() == "published" and w.current.other("challenger") is None  # the experiment is over
    assert counted == ["absent", "published", "refused", "absent", "published"]
