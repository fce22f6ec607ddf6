"""The operator's map (coast, borders, cities, equal scale, labels that do not collide) and the GeoJSON export of
stored fixes (real PostgreSQL, the CLI)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from heimdall_inference.cli import main


def test_the_shipped_basemap_covers_the_network_and_says_where_it_comes_from(spec):
    from heimdall_inference.cli.plot import load_basemap

    base = load_basemap()
    lon0, lat0, lon1, lat1 = base["bbox_lon_lat"]
    assert all(lon0 < r.lon < lon1 and lat0 < r.lat < lat1 for r in spec.network.receivers)
    assert "Natural Earth" in base["sources"]["coast_and_borders"] and "GeoNames" in base["sources"]["cities"]
    names = {c["name"] for c in base["cities"]}
    assert {"Turin", "Milan", "Genoa"} <= names and not any(n.startswith("Circoscrizione") for n in names)
    coast = np.concatenate([np.array(line) for line in base["coast"]])
    # the Ligurian coast runs south of the receivers, through Genoa (44.41 N, 8.93 E)
    near_genoa = coast[np.hypot(coast[:, 0] - 8.93, coast[:, 1] - 44.41) < 0.1]
    assert len(near_genoa) and len(base["borders"]) >= 2


def test_labels_never_collide_and_optional_ones_give_way(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from heimdall_inference.cli.plot import place_labels

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    fig.canvas.draw()
    crowd = [(f"place {i}", 5 + 0.05 * i, 5 + 0.05 * (i % 3), {"fontsize": 8}) for i in range(12)]
    kept = place_labels(ax, crowd, optional_from=2)
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in kept]
    assert 2 < len(kept) < 12  # the two required ones, and as many optional ones as fit
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0
    plt.close(fig)


def test_the_map_draws_fixes_over_the_basemap(tmp_path, localizer, scenes_and_payloads):
    pytest.importorskip("matplotlib")
    from heimdall_inference.cli.plot import plot_fixes

    scenes, docs = scenes_and_payloads
    fixes = localizer.predict_many(docs[:3])
    path = plot_fixes(localizer.spec.network, fixes, tmp_path / "map.png",
                      truths=[scenes.truth(i, localizer.spec.network) for i in range(3)])
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 700 and img.shape[1] > 800
    coast_blue = np.all(np.abs(img[..., :3] - np.array([0x3b, 0x6e, 0xa8]) / 255) < 0.05, axis=-1)
    assert coast_blue.sum() > 200  # the coastline is drawn


@pytest.mark.integration
def test_export_writes_stored_fixes_as_geojson_points_and_ellipses(tmp_path, localizer, scenes_and_payloads):
    from heimdall_inference.core.fix import covers
    from heimdall_inference.settings import Settings, set_process_settings
    from heimdall_inference.store import open_store
    from heimdall_inference.worker.service import Request, Service

    from ..live import PG_URL, port_open, unavailable

    if not port_open(PG_URL.split("@", 1)[1].split("/", 1)[0]):
        unavailable("PostgreSQL")
    schema = f"t_export_{__import__('uuid').uuid4().hex[:8]}"
    store = open_store(PG_URL, schema=schema)
    store.init_schema()
    try:
        svc = Service(localizer, store, alias="production")
        fixes = svc.predict_requests([Request({**copy.deepcopy(d), "request_id": f"geo-{i}"}, f"t{i}")
                                      for i, d in enumerate(scenes_and_payloads[1][:5])])
        set_process_settings(Settings(database_url=PG_URL, db_schema=schema))
        try:
            assert main(["export", "--geojson", str(tmp_path / "fixes.geojson"), "--since-hours", "0"]) == 0
        finally:
            set_process_settings(None)
        doc = json.loads((tmp_path / "fixes.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 10
        points = {f["properties"]["fix_key"]: f for f in doc["features"] if f["geometry"]["type"] == "Point"}
        polys = {f["properties"]["fix_key"]: f for f in doc["features"] if f["geometry"]["type"] == "Polygon"}
        for fix in fixes:
            p, poly = points[fix["request_id"]], polys[fix["request_id"]]
            assert p["geometry"]["coordinates"] == [fix["position"]["lon"], fix["position"]["lat"]]
            assert p["properties"]["model_alias"] == "production" and p["properties"]["receivers"] == fix["receivers_used"]
            ring = np.array(poly["geometry"]["coordinates"][0])
            assert (ring[0] == ring[-1]).all() and len(ring) == 73
            x, y = ring[:, 0], ring[:, 1]
            assert 0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0  # counter-clockwise (RFC 7946)
            # the ring is the fix's own 95 % ellipse: each vertex lies on its boundary
            e, n = localizer.spec.network.to_enu(ring[:-1, 1], ring[:-1, 0])
            assert all(covers(fix, ee, nn, 0.95) for ee, nn in zip(e * 0.99 + 0.01 * fix["position"]["east_m"],
                                                                   n * 0.99 + 0.01 * fix["position"]["north_m"]))
            assert not any(covers(fix, ee, nn, 0.95) for ee, nn in zip(e * 1.01 - 0.01 * fix["position"]["east_m"],
                                                                      n * 1.01 - 0.01 * fix["position"]["north_m"]))
    finally:
        store.drop_schema()
        store.close()
