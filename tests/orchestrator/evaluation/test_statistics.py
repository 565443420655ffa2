"""Intervals and paired comparisons against values computed independently here (tables, closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.evaluation.statistics import (Comparison, accuracy_interval, item_interval, paired_bootstrap,
                                                 seed_interval, seesaw_regressions)

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)
Z_975 = 1.959963984540054


def test_seed_interval_is_the_t_interval():
    acc = [0.60, 0.64, 0.62]
    sd = math.sqrt(sum((a - 0.62) ** 2 for a in acc) / 2)
    iv = seed_interval(acc)
    assert iv.mean == pytest.approx(0.62)
    assert iv.high - iv.mean == pytest.approx(T_975_DF2 * sd / math.sqrt(3))
    assert iv.method == "t" and iv.n == 3
    wide = seed_interval([0.1, 0.9])  # t(0.975, 1) = 12.7: the raw interval spans far past [0, 1]
    assert (wide.low, wide.high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_interval([0.5])


def test_one_seed_uses_the_wilson_interval_over_items():
    k, n = 120, 200
    p, z = k / n, Z_975
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    iv = item_interval(k, n)
    assert (iv.low, iv.high) == (pytest.approx(centre - half), pytest.approx(centre + half))
    # RESEARCH.md: 200 items at 60 % are worth about +-3.5 points of standard error... i.e. +-6.8 at 95 %
    assert iv.high - iv.low == pytest.approx(2 * 0.068, abs=0.002)
    one_seed = np.zeros((1, n))
    one_seed[0, :k] = 1
    assert accuracy_interval(one_seed) == iv


def test_paired_bootstrap_of_a_constant_gain_is_exact():
    rng = np.random.default_rng(1)
    b = {"t": (rng.random((3, 50)) < 0.5).astype(float)}
    a = {"t": b["t"].copy()}
    a["t"][:, :10] = 1.0  # a fixes 10 items that b may have missed
    gain = float((a["t"] - b["t"]).mean())
    res = paired_bootstrap(a, b, n_boot=2000)
    assert res.diff == pytest.approx(gain) and res.low <= gain <= res.high and res.low >= 0
    same = paired_bootstrap(b, b, n_boot=2000)
    assert (same.diff, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_width_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    n = 2000
    a = {"t": (rng.random((1, n)) < 0.65).astype(float)}
    b = {"t": (rng.random((1, n)) < 0.60).astype(float)}
    d = a["t"][0] - b["t"][0]
    se = d.std(ddof=1) / math.sqrt(n)  # the closed-form SE of a mean of paired differences
    res = paired_bootstrap(a, b, n_boot=4000, seed=3)
    assert res.se == pytest.approx(se, rel=0.08)
    assert res.high - res.low == pytest.approx(2 * Z_975 * se, rel=0.1)
    z = d.mean() / se
    p_normal = 2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2))))
    assert res.p == pytest.approx(p_normal, abs=0.01)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="unpaired shapes"):
        paired_bootstrap({"t": np.zeros((2, 5))}, {"t": np.zeros((3, 5))})
    with pytest.raises(ValueError, match="same tasks"):
        paired_bootstrap({"t": np.zeros((2, 5))}, {"u": np.zeros((2, 5))})


def test_seesaw_counts_only_drops_beyond_the_noise_threshold():
    deltas = {"a": Comparison(-0.05, -0.09, -0.01, 0.01, 0.02, 100),   # -2.5 SE: regressed
              "b": Comparison(-0.03, -0.07, 0.01, 0.2, 0.02, 100),    # -1.5 SE: noise
              "c": Comparison(0.04, 0.0, 0.08, 0.05, 0.02, 100),
              "d": Comparison(-0.10, -0.2, 0.0, 0.06, 0.06, 100)}     # -1.67 SE: noise
    out = seesaw_regressions(deltas, multiple=2.0)
    assert out["regressed"] == ["a"] and out["n_regressed_significant"] == 1
    assert out["expected_by_noise"] == pytest.approx(4 * 0.022750131948179195)  # 4 tasks x P(Z < -2)
