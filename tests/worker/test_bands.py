"""Both bands of the network in one service (no Celery): the shipped 2 m model serves, the shipped 70 cm model
answers the payloads its declared band holds, one feature pass per feature plan in a mixed batch, the model used
in the fix and the row."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from heimdall_inference.core.localizer import Localizer
from heimdall_inference.core.session import shipped_model_path
from heimdall_inference.errors import PayloadCode, PayloadError
from heimdall_inference.lab.simulator import Priors, scene_payloads, simulate
from heimdall_inference.registry.routes import parse_routes
from heimdall_inference.settings import Settings
from heimdall_inference.store import MemoryStore
from heimdall_inference.worker.context import _arms
from heimdall_inference.worker.routing import Arm, Router
from heimdall_inference.worker.service import Request, Service

from ..models import shifted_model


@pytest.fixture(scope="module")
def uhf() -> Localizer:
    return Localizer(shipped_model_path("70cm"))


@pytest.fixture(scope="module")
def uhf_payloads(spec, signal) -> list[dict]:
    scenes, iq = simulate(spec.network, 12, seed=707, signal=signal, priors=Priors.nominal("70cm"))
    return scene_payloads(scenes, iq, spec.network, signal, seed=707, request_prefix="uhf")


def _service(localizer, uhf, store=None, **kw) -> Service:
    router = Router(Arm(localizer, alias="production"), bands=[Arm(uhf, alias="production", source="registry")], **kw)
    return Service(localizer, store or MemoryStore(), router=router)


def test_the_shipped_models_declare_disjoint_bands_and_share_their_payloads(localizer, uhf):
    assert localizer.spec.bands_hz == ((144.0e6, 146.0e6),) and uhf.spec.bands_hz == ((430.0e6, 440.0e6),)
    assert uhf.spec.name == "localization_model_70cm" and uhf.same_payloads(localizer)
    assert not uhf.same_inputs(localizer)  # another band: never an A/B arm of the 2 m model


def test_a_mixed_batch_is_routed_by_centre_frequency_with_one_feature_pass_per_plan(localizer, uhf, uhf_payloads,
                                                                                   scenes_and_payloads, monkeypatch):
    store = MemoryStore()
    svc = _service(localizer, uhf, store)
    vhf = [copy.deepcopy(d) for d in scenes_and_payloads[1][:5]]
    docs = [d for pair in zip(vhf, copy.deepcopy(uhf_payloads[:5])) for d in pair]  # 2 m, 70 cm, 2 m, ...
    passes: list[int] = []
    real = Localizer.features

    def counted(self, decoded):
        passes.append(len(decoded))
        return real(self, decoded)

    monkeypatch.setattr(Localizer, "features", counted)
    out = svc.predict_requests([Request(d, f"t{i}") for i, d in enumerate(docs)])
    assert all(isinstance(f, dict) for f in out)
    names = [f["model"]["name"] for f in out]
    assert names == ["localization_model", "localization_model_70cm"] * 5
    # both models share one feature plan: one pass for the whole mixed batch
    assert uhf.spec.features == localizer.spec.features and passes == [10]
    # each fix is the one its band's model gives alone (to float32 rounding: the feature pass's matrix product
    # sums in an order that depends on the batch's shape and the CPU's BLAS kernel)
    alone = uhf.predict(copy.deepcopy(uhf_payloads[0]))
    assert out[1]["position"]["east_m"] == pytest.approx(alone["position"]["east_m"], abs=0.2)
    assert out[1]["position"]["north_m"] == pytest.approx(alone["position"]["north_m"], abs=0.2)
    assert np.allclose(out[1]["uncertainty"]["covariance_enu_m2"], alone["uncertainty"]["covariance_enu_m2"],
                       rtol=1e-4, atol=0)
    rows = {r["request_id"]: r for r in store.fixes.values()}
    assert rows["uhf-707-0"]["model_name"] == "localization_model_70cm" and rows["sim-101-0"]["model_name"] == "localization_model"


def test_band_models_with_their_own_feature_plan_get_their_own_pass(localizer, uhf, uhf_payloads, scenes_and_payloads,
                                                                    monkeypatch):
    import dataclasses

    other = copy.copy(uhf)
    other.spec = dataclasses.replace(uhf.spec, features=dataclasses.replace(uhf.spec.features, floor_dbm=-161.0))
    other.plan = type(uhf.plan)(other.spec.features)
    svc = _service(localizer, other)
    passes: list[int] = []
    real = Localizer.features
    monkeypatch.setattr(Localizer, "features", lambda self, d: passes.append(len(d)) or real(self, d))
    docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][:3]] + [copy.deepcopy(d) for d in uhf_payloads[:2]]
    out = svc.predict_requests([Request(d, f"t{i}") for i, d in enumerate(docs)])
    assert [f["model"]["name"] for f in out] == ["localization_model"] * 3 + ["localization_model_70cm"] * 2
    assert sorted(passes) == [2, 3]


def test_options_model_and_frequencies_outside_every_band(localizer, uhf, uhf_payloads, scenes_and_payloads):
    svc = _service(localizer, uhf)
    named = {**copy.deepcopy(uhf_payloads[0]), "options": {"model": "localization_model_70cm@production"}}
    assert svc.predict(named, task_id="a")["model"]["name"] == "localization_model_70cm"
    for wrong in ("localization_model@production", "models:/localization_model/1"):
        with pytest.raises(PayloadError) as err:
            svc.predict({**copy.deepcopy(uhf_payloads[1]), "options": {"model": wrong}}, task_id="b")
        assert err.value.code == PayloadCode.UNKNOWN_MODEL
    with pytest.raises(PayloadError) as err:
        svc.predict({**copy.deepcopy(scenes_and_payloads[1][0]), "center_freq_hz": 300e6}, task_id="c")
    assert err.value.code == PayloadCode.UNSUPPORTED_FREQUENCY and "430" in err.value.message
    # a worker without band models still refuses 70 cm, naming only its own band
    alone = Service(localizer, MemoryStore())
    with pytest.raises(PayloadError) as err:
        alone.predict(copy.deepcopy(uhf_payloads[0]), task_id="d")
    assert err.value.code == PayloadCode.UNSUPPORTED_FREQUENCY and "430" not in err.value.message


def test_the_shadow_and_the_split_stay_in_the_served_models_band(localizer, uhf, uhf_payloads, scenes_and_payloads,
                                                                  tmp_path):
    challenger = Localizer(shifted_model(tmp_path / "shifted.onnx"), name="localization_model", version="3")
    store = MemoryStore()
    router = Router(Arm(localizer, alias="production"), {"challenger": Arm(challenger, alias="challenger",
                                                                              ref="challenger")},
                    parse_routes("", "challenger", ""), primary_ref="production", bands=[Arm(uhf)])
    svc = Service(localizer, store, router=router)
    docs = [copy.deepcopy(scenes_and_payloads[1][0]), copy.deepcopy(uhf_payloads[0])]
    out = svc.predict_requests([Request(d, f"t{i}") for i, d in enumerate(docs)])
    assert [f["model"]["name"] for f in out] == ["localization_model", "localization_model_70cm"]
    assert len(store.shadows) == 1  # the 2 m fix has its shadow; the 70 cm one has none


def test_the_worker_builds_band_arms_from_its_settings(localizer):
    from heimdall_inference.registry.resolve import ModelSet, resolve_model

    settings = Settings()
    uris = settings.band_model_uris()
    assert uris == ("shipped:2m", "shipped:70cm")
    cache = __import__("pathlib").Path("/nonexistent")
    models = ModelSet.of(resolve_model("", cache_dir=cache), {}, {u: resolve_model(u, cache_dir=cache) for u in uris})
    router = _arms(settings, models, None)
    # the shipped 2 m model is the served one: left to it; the 70 cm one serves its band
    assert [a.name for a in router.bands] == ["localization_model_70cm"] and router.bands[0].source == "shipped"
    assert router.bands_hz == ((144.0e6, 146.0e6), (430.0e6, 440.0e6))
    none = _arms(Settings(band_models="none"), ModelSet.of(resolve_model("", cache_dir=cache)), None)
    assert none.bands == ()
    # a band model that overlaps the served model's band is not served beside it
    clash = ModelSet.of(resolve_model("", cache_dir=cache), {}, {"x": resolve_model(str(shipped_model_path("70cm")),
                                                                                       cache_dir=cache),
                                                                 "y": resolve_model(str(shipped_model_path("70cm")) + "",
                                                                                    cache_dir=cache)})
    assert [a.name for a in _arms(settings, clash, None).bands] == ["localization_model_70cm"]
