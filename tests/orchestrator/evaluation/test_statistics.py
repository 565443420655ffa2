"""Intervals, paired comparisons, power and the seesaw threshold against values computed independently here
(tables, closed forms, loops written out, scipy's own tests as oracle) and against simulations of the null."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.evaluation.statistics import (Bootstrap, Comparison, TTest, accuracy_interval, compare,
                                                 crossed_t, item_bootstrap, item_interval, mdd80,
                                                 mean_over_tasks_interval, per_seed_differences, regression_threshold,
                                                 seed_interval, seed_t, seesaw_regressions, t_test)

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom (tables)
Z_975 = 1.959963984540054
Z_80 = 0.8416212335729143
PHI_MINUS_2 = 0.022750131948179195  # P(Z < -2)


def _wilson(k: int, n: int) -> tuple[float, float]:
    p, z = k / n, Z_975
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def _t_quantile_df2(p: float) -> float:
    """Closed form for 2 df: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so t = u sqrt(2 / (1 - u^2)) with u = 2F - 1."""
    u = 2 * p - 1
    return u * math.sqrt(2 / (1 - u * u))


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
    iv = item_interval(k, n)
    assert (iv.low, iv.high) == pytest.approx(_wilson(k, n))
    # RESEARCH.md: 200 items at 60 % are worth about +-3.5 points of standard error... i.e. +-6.8 at 95 %
    assert iv.high - iv.low == pytest.approx(2 * 0.068, abs=0.002)
    one_seed = np.zeros((1, n))
    one_seed[0, :k] = 1
    assert accuracy_interval(one_seed) == iv


def test_mean_over_tasks_interval_over_seeds_by_hand():
    # task x: 4 items, per-seed accuracies 2/4, 3/4, 1/4; task y: 2 items, 1/2, 2/2, 1/2
    x = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]])
    y = np.array([[1, 0], [1, 1], [0, 1]])
    per_seed = [(0.5 + 0.5) / 2, (0.75 + 1.0) / 2, (0.25 + 0.5) / 2]   # 0.5, 0.875, 0.375
    mean = sum(per_seed) / 3                                           # 0.58333
    sd = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / 2)
    iv = mean_over_tasks_interval({"x": x, "y": y})
    assert iv.method == "t" and iv.n == 3 and iv.mean == pytest.approx(7 / 12)
    assert iv.high == pytest.approx(min(1.0, mean + T_975_DF2 * sd / math.sqrt(3)))
    assert iv.low == pytest.approx(max(0.0, mean - T_975_DF2 * sd / math.sqrt(3)))


def test_mean_over_tasks_interval_with_one_seed_shifts_the_pooled_wilson_interval():
    x = np.zeros((1, 100))
    x[0, :70] = 1                                     # 70 %
    y = np.zeros((1, 300))
    y[0, :150] = 1                                    # 50 %
    low, high = _wilson(220, 400)                     # pooled: 220 of 400 = 55 %
    iv = mean_over_tasks_interval({"x": x, "y": y})
    assert iv.method == "wilson" and iv.n == 400 and iv.mean == pytest.approx(0.60)  # equal task weights
    assert iv.low == pytest.approx(0.60 - (0.55 - low)) and iv.high == pytest.approx(0.60 + (high - 0.55))


def test_seed_t_is_the_t_test_of_the_per_seed_differences():
    rng = np.random.default_rng(4)
    a = {"x": (rng.random((3, 40)) < 0.6).astype(float), "y": (rng.random((3, 10)) < 0.5).astype(float)}
    b = {"x": (rng.random((3, 40)) < 0.5).astype(float), "y": (rng.random((3, 10)) < 0.5).astype(float)}
    d = [0.5 * (a["x"][s].sum() / 40 - b["x"][s].sum() / 40) + 0.5 * (a["y"][s].sum() / 10 - b["y"][s].sum() / 10)
         for s in range(3)]
    assert per_seed_differences(a, b) == pytest.approx(d)
    oracle = stats.ttest_1samp(d, 0.0)
    sd = math.sqrt(sum((v - sum(d) / 3) ** 2 for v in d) / 2)
    res = seed_t(a, b)
    assert (res.unit, res.n, res.df) == ("seed", 3, 2)
    assert res.mean == pytest.approx(sum(d) / 3) and res.se == pytest.approx(sd / math.sqrt(3))
    assert res.p == pytest.approx(oracle.pvalue)
    assert (res.low, res.high) == pytest.approx((res.mean - T_975_DF2 * res.se, res.mean + T_975_DF2 * res.se))
    # the per-method interval and the comparison use the same t: B at zero, the comparison is A's interval
    zero = {t: np.zeros_like(m) for t, m in a.items()}
    iv, diff = mean_over_tasks_interval(a), seed_t(a, zero)
    assert (diff.low, diff.high) == pytest.approx((iv.low, iv.high))


def test_seed_t_with_one_seed_is_the_paired_t_over_items():
    rng = np.random.default_rng(5)
    a = {"x": (rng.random((1, 300)) < 0.62).astype(float)}
    b = {"x": (rng.random((1, 300)) < 0.55).astype(float)}
    oracle = stats.ttest_rel(a["x"][0], b["x"][0])
    res = seed_t(a, b)
    assert (res.unit, res.n, res.df) == ("item", 300, 299) and res.p == pytest.approx(oracle.pvalue)
    # two tasks: stratified SE = sqrt(var_x / I_x + var_y / I_y) / 2, df = (I_x - 1) + (I_y - 1)
    a["y"], b["y"] = np.array([[1, 1, 0, 1.0]]), np.array([[0, 1, 1, 0.0]])
    dx, dy = a["x"][0] - b["x"][0], np.array([1, 0, -1, 1.0])
    se = math.sqrt(dx.var(ddof=1) / 300 + dy.var(ddof=1) / 4) / 2
    res = seed_t(a, b)
    assert res.mean == pytest.approx((dx.mean() + 0.25) / 2) and res.se == pytest.approx(se) and res.df == 302


def test_identical_methods_give_a_zero_difference_and_no_p_value():
    rng = np.random.default_rng(6)
    x = {"t": (rng.random((3, 50)) < 0.5).astype(float)}
    res = compare(x, {"t": x["t"].copy()}, n_boot=500)
    assert res.diff == 0.0 and res.bootstrap.p == 1.0
    # zero spread: undetermined, never p = 0 or p = 1 from a t with SE 0
    assert math.isnan(res.primary.p) and math.isnan(res.seed_t.p) and math.isnan(res.mdd80)
    assert not res.primary.determined and res.as_dict()["p"] is None and res.as_dict()["determined"] is False


def test_identical_nonzero_per_seed_differences_are_undetermined_for_the_seed_t_only():
    """MALoRA − MoLoRA on ARC-C in the first study: −1 item at every seed. The per-seed t has SE 0 (no p-value);
    the crossed test still has the item spread: one item of 320 against none is p ≈ 0.32 (a paired t over items)."""
    b = np.zeros((3, 320))
    a = b.copy()
    b[:, 7] = 1                                                          # B right on item 7 at every seed, A never
    res = compare({"t": a}, {"t": b}, n_boot=500)
    assert res.seed_t.mean == pytest.approx(-1 / 320) and res.seed_t.se == 0 and math.isnan(res.seed_t.p)
    d = (a - b).mean(axis=0)                                             # the item means: one -1, the rest 0
    oracle = stats.ttest_1samp(d, 0.0)                                   # no seed spread: the item t is the test
    assert res.primary.determined and res.primary.p == pytest.approx(oracle.pvalue, rel=1e-6)


def test_item_bootstrap_resamples_items_shared_by_seeds_and_methods():
    # every item has one effect shared by its 3 seeds and both methods (as when the items are the same)
    rng = np.random.default_rng(2)
    n = 1500
    b = (rng.random((1, n)) < 0.6).astype(float).repeat(3, axis=0)
    flip = rng.random(n) < 0.3                                          # a changes 30 % of the items, both ways
    a = b.copy()
    a[:, flip] = 1 - a[:, flip]
    a[1, :50] = 1 - a[1, :50]                                           # and one seed differs a little
    per_item = (a - b).mean(axis=0)
    se = per_item.std(ddof=1) / math.sqrt(n)                             # closed-form SE of a mean of I values
    res = item_bootstrap({"t": a}, {"t": b}, n_boot=4000, seed=3)
    assert res.diff == pytest.approx((a - b).mean())
    # resampling each seed's items independently would shrink the SE by about sqrt(3)
    assert res.se == pytest.approx(se, rel=0.06)
    assert res.high - res.low == pytest.approx(2 * Z_975 * se, rel=0.1)
    assert res.p == pytest.approx(2 * stats.norm.sf(abs(per_item.mean()) / se), abs=0.02)


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="unpaired shapes"):
        compare({"t": np.zeros((2, 5))}, {"t": np.zeros((3, 5))})
    with pytest.raises(ValueError, match="same tasks"):
        compare({"t": np.zeros((2, 5))}, {"u": np.zeros((2, 5))})


# ------------------------------------------------------------------------------------------ the null, simulated
def simulate_null(rng: np.random.Generator, *, n_sim: int, seeds: int, items: int, seed_sd: float,
                  tasks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two equal methods: (n_sim, tasks, seeds, items) 0/1 arrays. Item i of a study is right with probability
    p_i (uniform on [0.3, 0.8], shared by both methods: the same items), shifted per (method, seed) by a
    normal seed effect of SD ``seed_sd`` (accuracy units)."""
    p = rng.uniform(0.3, 0.8, size=(n_sim, tasks, 1, items))
    shift = rng.normal(0.0, seed_sd, size=(2, n_sim, tasks, seeds, 1))
    a = rng.random((n_sim, tasks, seeds, items)) < np.clip(p + shift[0], 0, 1)
    b = rng.random((n_sim, tasks, seeds, items)) < np.clip(p + shift[1], 0, 1)
    return a.astype(np.float32), b.astype(np.float32)


def seed_t_rejection_rate(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> float:
    """Share of simulated studies (one task) whose seed-t p-value is below ``alpha`` (vectorised t_test)."""
    d = (a - b).mean(axis=-1).mean(axis=1)                              # (n_sim, seeds): per-seed differences
    return float(np.mean(t_test(d)["p"] < alpha))


@pytest.mark.parametrize("seed_sd", [0.0, 0.02, 0.04])
def test_the_comparison_rejects_at_its_nominal_rate_under_the_null(seed_sd):
    """2,000 simulated studies of two equal methods at S = 3 and 500 items: the 5 % test rejects 3-7 %.

    (The joint seed+item bootstrap this replaced rejected 0.4 %, 3.1 % and 8.4 % of the same nulls, and would fail
    here: ``python benchmarks/stat_calibration.py --old 760b2f8``.)"""
    rng = np.random.default_rng(int(seed_sd * 1000) + 7)
    a, b = simulate_null(rng, n_sim=2000, seeds=3, items=500, seed_sd=seed_sd)
    assert 0.03 <= seed_t_rejection_rate(a, b) <= 0.07
    # the vectorised t is scipy's one-sample t over the per-seed differences
    first = seed_t({"t": a[0, 0]}, {"t": b[0, 0]})
    assert first.p == pytest.approx(stats.ttest_1samp((a[0, 0] - b[0, 0]).mean(axis=-1), 0.0).pvalue, rel=1e-5)


def test_mdd80_is_detected_four_times_in_five():
    # at large df the t-test is the z-test: MDD = (z_0.975 + z_0.8) * se, up to the far tail (< 1e-3)
    assert mdd80(1.0, 10**6) == pytest.approx(Z_975 + Z_80, abs=1e-3)
    # at S = 3 (df = 2), by simulation: a true difference of MDD is found in 80 % of studies
    rng = np.random.default_rng(8)
    sigma = 0.03                                                        # per-seed difference SD (3 points)
    delta = mdd80(sigma / math.sqrt(3), 2)
    assert delta / (sigma / math.sqrt(3)) == pytest.approx(5.65, abs=0.01)
    d = rng.normal(delta, sigma, size=(8000, 3))
    assert float(np.mean(t_test(d)["p"] < 0.05)) == pytest.approx(0.80, abs=0.02)
    res = compare({"t": np.array([[1, 0, 1.0], [1, 1, 1], [0, 0, 1]])}, {"t": np.zeros((3, 3))}, n_boot=200)
    se, df = res.primary.se, res.primary.df                              # Satterthwaite's df, fractional
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, res.mdd80 / se) + stats.nct.cdf(-crit, df, res.mdd80 / se)
    assert power == pytest.approx(0.80, abs=2e-3)   # df rounded to 0.01 for the cache


def test_seesaw_threshold_and_noise_count_by_hand():
    t2 = _t_quantile_df2(1 - PHI_MINUS_2)                                # 4.53: one-sided t at 2.3 %, 2 df
    assert float(regression_threshold(1.0, 2)) == pytest.approx(-t2)

    def delta(mean: float, se: float) -> Comparison:
        t = TTest(mean, mean - 1, mean + 1, 0.5 if se else float("nan"), 2, se, 3, "seed+item")
        return Comparison(t, t, Bootstrap(mean, 0, 0, 1, 0, 1), 0.0)

    deltas = {"a": delta(-0.05, 0.01), "b": delta(-0.05, 0.02), "c": delta(0.04, 0.01), "d": delta(-0.10, 0.0)}
    out = seesaw_regressions(deltas, multiple=2.0)
    # a: -5 SE (beyond -4.53 SE); b: -2.5 SE (a 2-SE rule would call it, the t rule does not); d: SE 0, no test
    assert out["regressed"] == ["a"] and out["n_regressed_significant"] == 1 and out["undetermined"] == ["d"]
    assert out["threshold"]["a"] == pytest.approx(-t2 * 0.01)
    assert out["p_one_sided"]["a"] == pytest.approx(stats.t.cdf(-5.0, 2))
    assert out["expected_by_noise"] == pytest.approx(4 * PHI_MINUS_2)


def test_seesaw_noise_count_matches_a_simulated_null():
    """8 tasks, 3 seeds, 200 items, seed SD 3 points: the report's rule flags Φ(−2) of the tasks under the null."""
    rng = np.random.default_rng(9)
    a, b = simulate_null(rng, n_sim=250, seeds=3, items=200, seed_sd=0.03, tasks=8)
    flagged = []
    for k in range(a.shape[0]):
        deltas = {}
        for t in range(a.shape[1]):
            x, y = {"t": a[k, t]}, {"t": b[k, t]}
            primary = crossed_t(x, y)
            deltas[str(t)] = Comparison(primary, primary, Bootstrap(0, 0, 0, 1, 0, 1), 0.0)
        flagged.append(seesaw_regressions(deltas)["n_regressed_significant"])
    # 2,000 task tests: the share is Φ(−2) = 2.3 % within about 3 binomial SEs (0.33 points each)
    assert float(np.sum(flagged)) / 2000 == pytest.approx(PHI_MINUS_2, abs=0.011)
