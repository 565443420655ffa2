"""The crossed seed x item test: its SE by hand on a small case, its projection, and its rejection rate under
simulated nulls of the study's regime (seed noise, answers flipping between seeds, with and without a method x item
interaction). More draws and regimes: ``python benchmarks/stat_calibration.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.evaluation.crossed import crossed_se, project_se
from orchestrator.evaluation.crossed import simulate_null as probit_null
from orchestrator.evaluation.statistics import crossed_t, seed_t


def rejection_rate(a: list[np.ndarray], b: list[np.ndarray], alpha: float = 0.05) -> float:
    mean, se, df, _ = crossed_se([x - y for x, y in zip(a, b)])
    return float(np.mean(2 * stats.t.sf(np.abs(mean) / se, df) < alpha))


def test_se_by_hand_on_a_small_crossed_table():
    # one task, S = 2 seeds, I = 3 items; d = [[1, 0, 0], [0, 0, -1]]
    d = np.array([[1.0, 0, 0], [0, 0, -1]])
    seed_means = d.mean(axis=1)                                          # 1/3, -1/3
    item_means = d.mean(axis=0)                                          # 1/2, 0, -1/2
    v_s = np.var(seed_means, ddof=1)                                     # 2/9
    v_i = np.var(item_means, ddof=1)                                     # 1/4
    resid = d - seed_means[:, None] - item_means[None, :] + d.mean()
    ms_r = (resid ** 2).sum() / ((2 - 1) * (3 - 1))
    item_component = max(0.0, v_i - ms_r / 2)
    se2 = v_s / 2 + item_component / 3
    mean, se, df, comps = crossed_se([d])
    assert float(mean) == pytest.approx(0.0) and float(se) == pytest.approx(math.sqrt(se2))
    # critical value: the midpoint of Satterthwaite's (over v_s/S with 1 df and, when the item component is kept,
    # v_i/I and MS_r/(S I) with 2 df each) and Cochran-Cox's (seed term at 1 df, item term at its own df)
    assert item_component > 0
    satterthwaite_df = se2 ** 2 / ((v_s / 2) ** 2 / 1 + (v_i / 3) ** 2 / 2 + (ms_r / 6) ** 2 / 2)
    rest = v_i / 3 - ms_r / 6
    rest_df = rest ** 2 / ((v_i / 3) ** 2 / 2 + (ms_r / 6) ** 2 / 2)
    cochran_cox = (v_s / 2 * stats.t.ppf(0.975, 1) + rest * stats.t.ppf(0.975, rest_df)) / se2
    crit = (stats.t.ppf(0.975, satterthwaite_df) + cochran_cox) / 2
    assert stats.t.ppf(0.975, float(df)) == pytest.approx(crit, rel=1e-6)
    assert comps.residual[0] == pytest.approx(ms_r) and comps.item[0] == pytest.approx(item_component)


def test_the_crossed_se_is_never_below_the_per_seed_t():
    rng = np.random.default_rng(1)
    a, b = probit_null(rng, n_sim=1, seeds=3, tasks=3, items=60, interaction=0.4, run_sd=0.05)
    x = {str(t): a[t][0] for t in range(3)}
    y = {str(t): b[t][0] for t in range(3)}
    crossed, conditional = crossed_t(x, y), seed_t(x, y)
    assert crossed.mean == pytest.approx(conditional.mean)
    assert crossed.se >= conditional.se and crossed.unit == "seed+item" and conditional.unit == "seed"


def test_projection_at_the_pilots_own_design_is_the_pilots_se_and_tracks_a_larger_one():
    rng = np.random.default_rng(5)
    a, b = probit_null(rng, n_sim=1, seeds=3, tasks=5, items=320, interaction=0.3, run_sd=0.03)
    mean, se, df, comps = crossed_se([x[0] - y[0] for x, y in zip(a, b)])
    projected, projected_df = project_se(comps, 3, 320)
    assert projected == pytest.approx(float(se), rel=1e-9) and projected_df == pytest.approx(float(df), rel=1e-9)
    # at 5 seeds x 1,000 items: the projected SE is the spread of D over 600 simulated studies of that design
    a, b = probit_null(rng, n_sim=600, seeds=5, tasks=5, items=1000, interaction=0.3, run_sd=0.03)
    spread = float(np.mean([x - y for x, y in zip(a, b)], axis=0).mean(axis=(-2, -1)).std())
    assert project_se(comps, 5, 1000)[0] == pytest.approx(spread, rel=0.2)


@pytest.mark.parametrize("interaction, run_sd", [(0.3, 0.03), (0.0, 0.05)], ids=["interaction", "no-interaction"])
def test_the_primary_test_rejects_at_its_nominal_rate_under_the_null(interaction, run_sd):
    """1,200 simulated studies of the study's shape (3 seeds, 5 tasks x 320 items, ~4 % of answers flipping
    between seeds): the crossed test rejects within [3 %, 7 %] at nominal 5 %. With the interaction, the per-seed
    t (conditional on the items) rejects far more often: the items' draw is a source of variance it leaves out."""
    rng = np.random.default_rng(11 if interaction else 12)
    a, b = probit_null(rng, n_sim=1200, seeds=3, tasks=5, items=320, interaction=interaction, run_sd=run_sd)
    flips = float(np.mean([np.mean(x[:, 0] != x[:, 1]) for x in a]))
    assert 0.03 <= flips <= 0.06                                          # the regime: ~4 % of answers flip
    assert 0.03 <= rejection_rate(a, b) <= 0.07
    per_seed = np.mean([(x - y).mean(axis=-1) for x, y in zip(a, b)], axis=0)   # (n_sim, seeds)
    conditional = float(np.mean(stats.ttest_1samp(per_seed, 0.0, axis=-1).pvalue < 0.05))
    if interaction:
        assert conditional > 0.10
    else:
        assert 0.03 <= conditional <= 0.07


def test_too_few_seeds_or_items_are_refused():
    with pytest.raises(ValueError, match="at least 2 seeds and 2 items"):
        crossed_se([np.zeros((1, 5))])
    with pytest.raises(ValueError, match="at least 2 seeds and 2 items"):
        project_se(crossed_se([np.eye(3)])[3], 1, 100)


def test_the_bound_from_a_reports_two_ses_is_never_below_the_crossed_se():
    """A report without per-item answers recorded the per-seed t's SE and the item bootstrap's SE: their
    root-sum-of-squares bounds the crossed SE (it counts the residual twice)."""
    from orchestrator.evaluation.crossed import bound_from_summary
    from orchestrator.evaluation.statistics import item_bootstrap

    rng = np.random.default_rng(21)
    for interaction in (0.0, 0.4):
        a, b = probit_null(rng, n_sim=1, seeds=3, tasks=5, items=320, interaction=interaction, run_sd=0.03)
        x, y = {str(t): a[t][0] for t in range(5)}, {str(t): b[t][0] for t in range(5)}
        crossed, conditional = crossed_t(x, y), seed_t(x, y)
        boot = item_bootstrap(x, y, n_boot=4000, seed=1)
        se, df = bound_from_summary(conditional.se, boot.se, 3, 1600)
        assert se == pytest.approx(math.hypot(conditional.se, boot.se))
        assert se >= crossed.se * 0.97                     # the bootstrap SE is itself an estimate (±3 %)
        assert 2 <= df <= 1600
