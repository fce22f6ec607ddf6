"""A/B arms, options.model and the shadow, in the service (no Celery): two real models, the shipped one and a copy
whose every position is 2 km further east."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from heimdall_inference.core.localizer import Localizer
from heimdall_inference.errors import PayloadCode, PayloadError
from heimdall_inference.registry.routes import parse_routes
from heimdall_inference.store import MemoryStore
from heimdall_inference.worker.routing import Arm, Router, draw
from heimdall_inference.worker.service import Request, Service

from ..models import shifted_model


@pytest.fixture(scope="module")
def challenger(tmp_path_factory) -> Localizer:
    return Localizer(shifted_model(tmp_path_factory.mktemp("models") / "shifted.onnx"), name="localization_model",
                     version="3")


def _router(localizer, challenger, split="production=80,challenger=20", shadow="", allow="") -> Router:
    prod = Arm(localizer, alias="production")
    return Router(prod, {"challenger": Arm(challenger, alias="challenger", ref="challenger")},
                  parse_routes(split, shadow, allow), primary_ref="production")


def _decoded(localizer, doc, **fields):
    return localizer.decode({**copy.deepcopy(doc), **fields})


def test_draw_is_a_stable_uniform_point_per_key():
    assert draw("session-1") == draw("session-1") and 0 <= draw("session-1") < 1
    points = np.array([draw(f"s{i}") for i in range(20_000)])
    assert abs(points.mean() - 0.5) < 0.01 and abs((points < 0.2).mean() - 0.2) < 0.01


def test_the_split_is_weighted_and_sticky_and_a_ramp_up_only_moves_sessions_in(localizer, challenger,
                                                                                scenes_and_payloads):
    doc = scenes_and_payloads[1][0]
    d = [_decoded(localizer, doc, session_id=f"session-{i}") for i in range(3000)]
    r20 = _router(localizer, challenger)
    arms = [r20.choose(x).alias for x in d]
    share = arms.count("challenger") / len(arms)
    assert abs(share - 0.2) < 4 * math.sqrt(0.2 * 0.8 / len(arms))  # binomial, 4 sigma
    assert [r20.choose(x).alias for x in d] == arms  # sticky
    r10 = _router(localizer, challenger, split="production=90,challenger=10")
    in10 = {i for i, x in enumerate(d) if r10.choose(x).alias == "challenger"}
    in20 = {i for i, a in enumerate(arms) if a == "challenger"}
    assert in10 < in20  # growing the last arm's share never moves a session out of it
    # without a session id, the request id is the key; without either, the task id
    k = _decoded(localizer, doc, request_id="req-7")
    assert r20.choose(k, "task-a") is r20.choose(k, "task-b")
    no_ids = copy.deepcopy(doc)
    no_ids.pop("request_id")
    n = localizer.decode(no_ids)
    assert {r20.choose(n, f"t{i}").alias for i in range(100)} == {"production", "challenger"}


def test_options_model_picks_an_allowed_arm_and_anything_else_is_a_typed_error(localizer, challenger,
                                                                               scenes_and_payloads):
    doc = scenes_and_payloads[1][0]
    r = _router(localizer, challenger, split="", shadow="challenger")  # loaded for the shadow, not allowed
    with pytest.raises(PayloadError) as err:
        r.choose(_decoded(localizer, doc, options={"model": "challenger"}))
    assert err.value.code == PayloadCode.UNKNOWN_MODEL and err.value.field == "options.model"
    r = _router(localizer, challenger, split="", allow="challenger")
    for name in ("challenger", "3", "localization_model@challenger", "models:/localization_model/3"):
        assert r.choose(_decoded(localizer, doc, options={"model": name})).alias == "challenger"
    for name in ("production", "2", "models:/localization_model@production"):
        assert r.choose(_decoded(localizer, doc, options={"model": name})).alias == "production"
    assert r.choose(_decoded(localizer, doc, session_id="anyone")).alias == "production"  # no split: the served one
    with pytest.raises(PayloadError, match="is not served here"):
        r.choose(_decoded(localizer, doc, options={"model": "4"}))


def test_an_arm_that_is_not_loaded_gives_its_share_to_the_served_model(localizer, scenes_and_payloads):
    r = Router(Arm(localizer, alias="production"), {}, parse_routes("production=50,challenger=50", "challenger",
                                                                    "challenger"), primary_ref="production")
    doc = scenes_and_payloads[1][0]
    assert {r.choose(_decoded(localizer, doc, session_id=f"s{i}")).alias for i in range(200)} == {"production"}
    with pytest.raises(PayloadError):  # asked for by name: not here now, a typed error, never another model
        r.choose(_decoded(localizer, doc, options={"model": "challenger"}))
    assert r.shadow is None and r.shadow_for(r.primary) is None


class _CountingLocalizer:
    """Counts the feature passes a localizer makes."""

    def __init__(self, monkeypatch, loc):
        self.calls = 0
        real = loc.features

        def features(decoded):
            self.calls += 1
            return real(decoded)

        monkeypatch.setattr(loc, "features", features)


def test_the_shadow_runs_on_the_same_features_and_is_stored_beside_never_returned(localizer, challenger,
                                                                                  scenes_and_payloads, monkeypatch):
    store = MemoryStore()
    svc = Service(localizer, store, router=_router(localizer, challenger, split="", shadow="challenger"))
    counting = _CountingLocalizer(monkeypatch, localizer)
    docs = scenes_and_payloads[1][:8]
    reqs = [Request({**copy.deepcopy(d), "request_id": f"r{i}"}, f"t{i}") for i, d in enumerate(docs)]
    out = svc.predict_requests(reqs)
    assert counting.calls == 1  # one feature pass for the served model and the shadow
    assert all(f["model"] == {"name": "localization_model", "version": "2", "alias": "production"} for f in out)
    assert sorted(k for k, _, _ in store.shadows) == [f"r{i}" for i in range(8)]
    for f in out:
        sh = store.shadows[(f["request_id"], f["captured_at"], "3")]
        assert (sh["served_version"], sh["model_alias"]) == ("2", "challenger")
        assert sh["east_m"] - f["position"]["east_m"] == pytest.approx(2000.0, abs=0.2)  # the shifted model
        assert sh["north_m"] == pytest.approx(f["position"]["north_m"], abs=0.2)
        assert sh["cov_ee_m2"] == pytest.approx(f["uncertainty"]["covariance_enu_m2"][0][0], rel=1e-6)
    # the same fixes alone, without a shadow: the served answer does not depend on the shadow
    alone = Service(localizer, MemoryStore()).predict_requests(
        [Request({**copy.deepcopy(d), "request_id": f"r{i}"}, f"t{i}") for i, d in enumerate(docs)])
    assert [f["position"] for f in alone] == [f["position"] for f in out]
    # chunks get their shadows too, keyed like their fixes
    chunk_docs = [copy.deepcopy(d) for d in scenes_and_payloads[1][8:12]]
    for d in chunk_docs:
        d.pop("request_id")
    summary = svc.predict_chunk(chunk_docs, task_id="c", offset=0)
    assert summary["fixes"] == 4 and {k for k, _, _ in store.shadows} >= {"c:0", "c:1", "c:2", "c:3"}


def test_a_split_serves_each_arm_from_its_own_model_and_cache_key(localizer, challenger, scenes_and_payloads):
    from .test_service import _FakeCache

    store, cache = MemoryStore(), _FakeCache()
    keys: list[str] = []
    cache.put_many = lambda model_version, items: keys.append(model_version)  # type: ignore[method-assign]
    svc = Service(localizer, store, cache, router=_router(localizer, challenger, split="production=50,challenger=50",
                                                          shadow="challenger"))
    docs = scenes_and_payloads[1][:20]
    out = svc.predict_requests([Request({**copy.deepcopy(d), "request_id": f"q{i}", "session_id": f"s{i}"}, f"t{i}")
                                for i, d in enumerate(docs)])
    by_arm = {a: [f for f in out if f["model"]["alias"] == a] for a in ("production", "challenger")}
    assert by_arm["production"] and by_arm["challenger"]
    assert {f["model"]["version"] for f in by_arm["challenger"]} == {"3"}
    assert {f["request_id"] for f in by_arm["challenger"]} == {
        f"q{i}" for i in range(20) if draw(f"s{i}") >= 0.5}
    assert {r["model_alias"] for r in store.fixes.values()} == {"production", "challenger"}
    # the shadow stands beside the production fixes only (the challenger is the shadow model itself)
    assert {k for k, _, _ in store.shadows} == {f["request_id"] for f in by_arm["production"]}
    ch, pr = svc.router.arm("challenger"), svc.router.primary
    assert set(keys) == {ch.cache_key, pr.cache_key} and ch.cache_key != pr.cache_key


def test_a_conflicting_request_id_stores_no_shadow_row(localizer, challenger, scenes_and_payloads):
    store = MemoryStore()
    svc = Service(localizer, store, router=_router(localizer, challenger, split="", shadow="challenger"))
    a, b = (copy.deepcopy(d) for d in scenes_and_payloads[1][:2])
    svc.predict({**a, "request_id": "same", "captured_at": a["captured_at"]}, task_id="t1")
    with pytest.raises(PayloadError) as err:
        svc.predict({**b, "request_id": "same", "captured_at": a["captured_at"]}, task_id="t2")
    assert err.value.code == "conflict" and len(store.shadows) == 1


def test_a_failing_shadow_never_fails_the_served_fix(localizer, challenger, scenes_and_payloads, monkeypatch):
    from prometheus_client import CollectorRegistry

    from heimdall_inference.ops.metrics import ServiceMetrics

    reg = CollectorRegistry()
    store = MemoryStore()
    svc = Service(localizer, store, metrics=ServiceMetrics(reg),
                  router=_router(localizer, challenger, split="", shadow="challenger"))

    def broken(*a, **k):
        raise RuntimeError("the shadow's session is broken")

    monkeypatch.setattr(challenger, "fixes", broken)
    out = svc.predict_requests([Request({**copy.deepcopy(d), "request_id": f"f{i}"}, f"t{i}")
                                for i, d in enumerate(scenes_and_payloads[1][:3])])
    assert all(isinstance(f, dict) for f in out) and store.count_fixes() == 3 and not store.shadows
    assert reg.get_sample_value("heimdall_shadow_errors_total") == 3
    assert reg.get_sample_value("heimdall_fixes_total", {"model": "localization_model", "model_version": "2", "role": "served",
                                                         "cached": "false"}) == 3


def test_shadow_metrics_count_the_shadow_and_how_far_it_lies(localizer, challenger, scenes_and_payloads):
    from prometheus_client import CollectorRegistry

    from heimdall_inference.ops.metrics import ServiceMetrics

    reg = CollectorRegistry()
    svc = Service(localizer, MemoryStore(), metrics=ServiceMetrics(reg),
                  router=_router(localizer, challenger, split="", shadow="challenger"))
    svc.predict_requests([Request({**copy.deepcopy(d), "request_id": f"m{i}"}, f"t{i}")
                          for i, d in enumerate(scenes_and_payloads[1][:5])])
    v = reg.get_sample_value
    assert v("heimdall_fixes_total", {"model": "localization_model", "model_version": "3", "role": "shadow", "cached": "false"}) == 5
    assert v("heimdall_shadow_distance_meters_count") == 5
    assert v("heimdall_shadow_distance_meters_bucket", {"le": "1000.0"}) == 0
    assert v("heimdall_shadow_distance_meters_bucket", {"le": "2500.0"}) == 5  # 2 km apart, every one


def test_a_shadow_table_the_database_refuses_leaves_the_served_fixes_stored(localizer, challenger,
                                                                            scenes_and_payloads, tmp_path):
    from prometheus_client import CollectorRegistry

    from heimdall_inference.ops.metrics import ServiceMetrics
    from heimdall_inference.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.sqlite3")
    store.init_schema()
    store._run(lambda c: c.execute("DROP TABLE shadow_fixes"))
    reg = CollectorRegistry()
    svc = Service(localizer, store, metrics=ServiceMetrics(reg),
                  router=_router(localizer, challenger, split="", shadow="challenger"))
    try:
        out = svc.predict_requests([Request({**copy.deepcopy(d), "request_id": f"x{i}"}, f"t{i}")
                                    for i, d in enumerate(scenes_and_payloads[1][:3])])
        assert all(isinstance(f, dict) for f in out) and store.count_fixes() == 3
        assert reg.get_sample_value("heimdall_shadow_errors_total") == 3
    finally:
        store.close()


def test_a_soft_time_limit_while_a_new_arm_loads_ends_the_pass(monkeypatch, tmp_path):
    """Found in review: loading a secondary arm caught every Exception, SoftTimeLimitExceeded included."""
    from celery.exceptions import SoftTimeLimitExceeded

    from heimdall_inference.core.session import default_model_path
    from heimdall_inference.registry.resolve import ModelSet, ResolvedModel
    from heimdall_inference.settings import Settings
    from heimdall_inference.worker import context

    from heimdall_inference.registry.cache import file_sha256

    sha = file_sha256(default_model_path())  # as the registry's tag says, once verified

    def model(version, alias):
        return ResolvedModel(path=default_model_path(), source="registry", name="localization_model", version=version,
                             alias=alias, sha256=sha, uri=f"models:/localization_model@{alias}")

    settings = Settings(model_uri="models:/localization_model@production", model_shadow="challenger")
    real = context._localizer

    def slow(settings, m, fetch):
        if m is not None and m.version == "4":
            raise SoftTimeLimitExceeded()
        return real(settings, m, fetch)

    monkeypatch.setattr(context, "_localizer", slow)
    first = context._arms(settings, ModelSet.of(model("1", "production"), {"challenger": model("2", "challenger")}),
                          None, interrupts=(SoftTimeLimitExceeded,))
    assert first.shadow is not None and first.shadow.version == "2"
    with pytest.raises(SoftTimeLimitExceeded):
        context._arms(settings, ModelSet.of(model("1", "production"), {"challenger": model("4", "challenger")}),
                      None, reuse=first, interrupts=(SoftTimeLimitExceeded,))
    kept = context._arms(settings, ModelSet.of(model("1", "production"), {"challenger": model("5", "challenger")}),
                         None, reuse=first)
    assert kept.shadow.version == "5" and kept.primary.localizer is first.primary.localizer  # reused, not reloaded
