"""Holm, Benjamini-Hochberg and TOST against hand-computed cases and a brute-force TOST by simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.evaluation.multiplicity import adjust, benjamini_hochberg, holm, judge_comparisons, tost, verdict


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.04 with m = 3: 3 x 0.01 = 0.03; 2 x 0.02 = 0.04; 1 x 0.04 = 0.04 (monotone max)
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # monotonicity: 3 x 0.01 = 0.03, 2 x 0.011 = 0.022 -> raised to 0.03; capped at 1
    assert holm([0.01, 0.011, 0.9]) == pytest.approx([0.03, 0.03, 0.9])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])


def test_benjamini_hochberg_by_hand():
    # m = 4, sorted p 0.01, 0.02, 0.03, 0.2: m p / rank = 0.04, 0.04, 0.04, 0.2 (then the running min from the top)
    assert benjamini_hochberg([0.03, 0.2, 0.01, 0.02]) == pytest.approx([0.04, 0.2, 0.04, 0.04])


def test_undetermined_tests_stay_out_of_the_family():
    out = holm([0.01, float("nan"), 0.04])
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.04)  # m = 2
    assert adjust({"a": 0.01, "b": None}, "bh") == {"a": pytest.approx(0.01), "b": None}


def test_tost_equals_two_one_sided_t_tests_by_hand():
    diff, se, df, margin = 0.002, 0.003, 4.0, 0.008
    lower = 1 - stats.t.cdf((diff + margin) / se, df)                   # H0: Δ <= -δ
    upper = stats.t.cdf((diff - margin) / se, df)                       # H0: Δ >= +δ
    out = tost(diff, se, df, margin)
    assert out["p"] == pytest.approx(max(lower, upper)) and out["equivalent"] == (max(lower, upper) < 0.05)
    # equivalent exactly when the 90 % interval lies inside (-δ, δ)
    low, high = out["ci90"]
    assert out["equivalent"] == (low > -margin and high < margin)
    assert tost(0.0, 0.0, 2.0, margin)["equivalent"] is False          # SE 0: undetermined, never "equivalent"


def test_tost_holds_its_level_at_the_margin():
    """True Δ exactly at +δ: the TOST says "equivalent" in at most 5 % of 4,000 simulated studies."""
    rng = np.random.default_rng(0)
    df, sigma, margin = 6, 0.01, 0.008
    est = margin + sigma * rng.standard_normal(4_000)
    se = sigma * np.sqrt(rng.chisquare(df, 4_000) / df)
    rate = np.mean([tost(e, s, df, margin)["equivalent"] for e, s in zip(est, se)])
    assert rate <= 0.06   # 5 % plus 3 binomial SEs


def test_verdicts():
    eq = tost(0.001, 0.002, 30.0, 0.008)
    assert verdict(0.02, 0.001, eq, 0.01) == "A > B"
    assert verdict(-0.02, 0.001, eq, 0.01) == "A < B"
    assert verdict(-0.02, 0.001, eq, 0.01, names=("malora", "molora")) == "malora < molora"
    assert verdict(0.001, 0.6, eq, 0.006).startswith("equivalent within ±0.8 points")
    wide = tost(0.001, 0.02, 30.0, 0.008)
    assert verdict(0.001, 0.9, wide, 0.057) == "not distinguishable (MDD 5.70 points)"
    assert verdict(0.0, None, wide, None).startswith("undetermined")
    # a TOST p below 0.001 (here about 1e-12: the 90 % CI +-0.16 points inside +-0.8) is never printed as 0.000
    tight = tost(0.0, 0.001, 30.0, 0.008)
    assert tight["p"] < 1e-6
    assert verdict(0.0, 0.9, tight, 0.003) == "equivalent within ±0.8 points (TOST p < 0.001)"


def test_judge_comparisons_adjusts_the_family_and_names_the_methods():
    wide = tost(0.001, 0.02, 30.0, 0.008)
    family = [{"a": "malora", "b": "molora", "diff": 0.012, "p": 0.01, "tost": wide, "mdd80": 0.01},
              {"a": "malora", "b": "lora", "diff": -0.015, "p": 0.04, "tost": wide, "mdd80": 0.01},
              {"a": "molora", "b": "lora", "diff": 0.002, "p": 0.30, "tost": wide, "mdd80": 0.03}]
    judge_comparisons(family)
    # Holm by hand: sorted p 0.01, 0.04, 0.30 times 3, 2, 1 -> 0.03, 0.08, 0.30 (monotone already)
    assert [c["p_holm"] for c in family] == pytest.approx([0.03, 0.08, 0.30])
    assert [c["verdict"] for c in family] == ["malora > molora", "not distinguishable (MDD 1.00 points)",
                                              "not distinguishable (MDD 3.00 points)"]
