"""The shipped models keep their cards' word: on fresh held-out scenes of both worlds, in both bands, the 68 % and
95 % ellipses cover the truth as often as the card says, within binomial tolerance, and the errors are the card's.

Small and seeded (the model alone, no grid posterior: seconds), on other seeds than the card's."""

from __future__ import annotations

import math

import pytest

from heimdall_inference.core.session import ModelSession, shipped_model_path
from heimdall_inference.lab.evaluation import evaluate
from heimdall_inference.lab.simulator import Priors

SCENES = 500


@pytest.mark.parametrize("band", ["2m", "70cm"])
@pytest.mark.parametrize("world", ["nominal", "wide"])
def test_coverage_matches_the_card_within_binomial_tolerance(band, world):
    path = shipped_model_path(band)
    card = ModelSession(path).spec.card["evaluations"][world]
    report = evaluate(path, scenes=SCENES, seed=7100 + len(band) + 10 * len(world), priors=Priors.preset(world, band),
                      grid=False)
    for level in ("0.68", "0.95"):
        p_card = card["model"]["coverage_pct"][level] / 100
        seen = report.covered(float(level))
        # both are binomial estimates of the same coverage: 4 sigma of their difference
        sigma = math.sqrt(p_card * (1 - p_card) * (1 / SCENES + 1 / card["scenes"]))
        assert abs(seen - p_card) < 4 * sigma + 1e-9, (band, world, level, seen, p_card)
    # the median error is a ratio estimate: within 15 % of the card's (its spread over 500 scenes is ~5 %)
    median = float(report.figures()["model"]["median_km"])
    assert abs(median / card["model"]["median_km"] - 1) < 0.15, (band, world, median, card["model"]["median_km"])


@pytest.mark.parametrize("band", ["2m", "70cm"])
def test_the_cards_say_the_models_are_at_the_limit_and_never_overconfident(band):
    """The figures the cards report (what the tests above re-measure): point estimates at the power-only limit in
    both worlds; the wide world's ellipses meet its targets; the nominal world's are conservative, never
    overconfident, by no more than the exact Bayes posterior of the training mixture is (README, "The models":
    one model cannot be calibrated in both worlds)."""
    ev = ModelSession(shipped_model_path(band)).spec.card["evaluations"]
    nominal, wide = ev["nominal"], ev["wide"]
    assert nominal["ratios"]["median_error_model_over_grid"] <= 1.1
    for level, target, most in (("0.68", 68.0, 81.0), ("0.95", 95.0, 99.0)):
        assert target - 2.0 <= nominal["model"]["coverage_pct"][level] <= most
        assert target - 2.0 <= nominal["model"]["coverage_worst_seen_tercile_pct"][level] <= most
    assert wide["ratios"]["median_error_model_over_grid"] <= 1.15
    assert wide["model"]["coverage_pct"]["0.95"] >= 92.0 and wide["model"]["coverage_pct"]["0.68"] >= 62.0
    seen = wide["model"]["coverage_worst_seen_tercile_pct"]
    assert seen["0.95"] >= 92.0 and seen["0.68"] >= 62.0
