"""Held-out evaluation: every figure of the model card, both worlds, the reliability diagram, the receiver counts,
and the card itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from heimdall_inference.core.session import ModelSession, card_path, shipped_model_path
from heimdall_inference.lab.card import card_figures, plot_reliability, write_model_card
from heimdall_inference.lab.evaluation import RELIABILITY_LEVELS, band_of, evaluate
from heimdall_inference.lab.simulator import Priors


@pytest.mark.slow
def test_evaluate_reports_every_figure(tmp_path):
    report = evaluate(scenes=24, seed=3, grid_step_m=5000.0)
    f = report.figures()
    assert f["scenes"] == 24 and f["world"] == "nominal" and f["band"] == "2m"
    for who in ("model", "grid_posterior"):
        assert f[who]["median_km"] > 0
        assert set(f[who]["coverage_pct"]) == {"0.68", "0.95"}
    assert 0 < f["ratios"]["cost_model_over_grid"] < 1
    assert "median error" in report.table()
    rel = f["reliability"]
    assert rel["levels"] == list(RELIABILITY_LEVELS) and len(rel["model_pct"]) == len(rel["grid_hpd_pct"])
    assert all(a <= b for a, b in zip(rel["model_pct"], rel["model_pct"][1:]))  # a larger ellipse holds more
    assert rel["model_pct"][RELIABILITY_LEVELS.index(0.95)] == f["model"]["coverage_pct"]["0.95"]
    counts = f["by_receivers"]
    assert sum(r["scenes"] for r in counts.values()) == 24 and set(counts) <= {"3", "4", "5", "6", "7"}
    k = next(iter(counts))
    assert counts[k]["model_median_km"] == round(float(np.median(report.errors_km[report.n_online == int(k)])), 2)
    assert report.receivers_table().count("\n") == len(counts) + 1


def test_evaluate_reports_the_wide_world_against_its_own_grid_posterior(tmp_path, capsys):
    from heimdall_inference.cli import main

    out, png = tmp_path / "wide.json", tmp_path / "wide.png"
    assert main(["evaluate", "--world", "wide", "--scenes", "24", "--seed", "5", "--grid-step-m", "8000",
                 "--json", str(out), "--reliability", str(png)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("world: wide, band: 2m") and "nan" not in text.split("cost ms per fix")[0]
    figures = json.loads(out.read_text())
    assert figures["world"] == "wide" and figures["scenes"] == 24 and figures["grid_posterior"]["grid_step_m"] == 8000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_70cm_band_is_evaluated_with_its_own_physics(capsys):
    from heimdall_inference.cli import main

    assert band_of(ModelSession(shipped_model_path("70cm")).spec) == "70cm"
    assert main(["evaluate", "--band", "70cm", "--scenes", "16", "--seed", "6", "--grid-step-m", "10000"]) == 0
    assert capsys.readouterr().out.startswith("world: nominal, band: 70cm")
    report = evaluate(shipped_model_path("70cm"), scenes=16, seed=6, grid=False)
    assert report.band == "70cm" and report.priors["noise_figure_db"] == 6.0 and "grid_posterior" not in report.figures()


def test_a_card_is_rewritten_from_the_figures_in_its_models_metadata(tmp_path):
    import shutil

    from heimdall_inference.lab.card import rewrite_card

    model = tmp_path / "localization_model_70cm.onnx"
    shutil.copy(shipped_model_path("70cm"), model)
    card = rewrite_card(model)
    assert card == tmp_path / "MODEL_CARD_70cm.md" and (tmp_path / "reliability_70cm.png").is_file()
    shipped = card_path(shipped_model_path("70cm")).read_text()
    assert card.read_text() == shipped  # the shipped card is exactly what its metadata says


def test_the_card_shows_every_world_its_receiver_counts_and_its_reliability_diagram(tmp_path):
    path = shipped_model_path("2m")
    worlds = [evaluate(path, scenes=40, seed=9, priors=Priors.preset(w, "2m"), grid_step_m=10000.0).figures()
              for w in ("nominal", "wide")]
    spec = ModelSession(path).spec
    card, png = tmp_path / "MODEL_CARD.md", tmp_path / "reliability_2m.png"
    plot_reliability(worlds, png, "test")
    write_model_card(worlds, spec, card, png)
    text = card.read_text()
    assert "### nominal world (40 scenes" in text and "### wide world (40 scenes" in text
    assert "![reliability diagram](reliability_2m.png)" in text and png.is_file()
    assert text.count("| receivers | scenes |") == 2
    doc = json.loads(text[text.rindex("```json") + 7:text.rindex("```")])
    assert doc == json.loads(json.dumps(card_figures(worlds)))
    assert set(doc["evaluations"]) == {"nominal", "wide"}


def test_each_shipped_model_has_its_card_beside_it():
    for band in ("2m", "70cm"):
        path = shipped_model_path(band)
        card = card_path(path)
        assert card.name == ("MODEL_CARD.md" if band == "2m" else "MODEL_CARD_70cm.md")
        assert card.is_file() and (card.parent / f"reliability_{band}.png").is_file()
        spec = ModelSession(path).spec
        assert set(spec.card["evaluations"]) == {"nominal", "wide"} and band_of(spec) == band
