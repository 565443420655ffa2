"""A search's wall-time estimate: ASHA's rungs, its expected stopping (a closed form, Ray's own bracket), and the
makespan by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.spec.space import load_space
from orchestrator.tuning.estimate import Rates
from orchestrator.report.search_report import rungs
from orchestrator.tuning.search_estimate import calibration_configs, search_estimate, stop_evaluations

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
TASKS = ("piqa", "obqa", "boolq", "arc_c", "arc_e")


def _rounded(expected: list[float], values: list[int], n: int) -> list[int]:
    """Whole trials per value by largest remainder (summing to n), as a sorted list of values."""
    counts = [int(e) for e in expected]
    for i in sorted(range(len(expected)), key=lambda i: -(expected[i] - counts[i]))[:n - sum(counts)]:
        counts[i] += 1
    return [v for v, c in zip(values, counts) for _ in range(c)]


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7])
def test_one_rung_stopping_matches_the_closed_form(n):
    """One rung (grace 1, eta 3, 3 evaluations): the k-th trial meets the 2/3 quantile of k - 1 uniform scores,
    whose expectation is (1 + (k - 2) 2/3) / k by the order statistics E[x_(j)] = j / k; so it goes on with
    probability 1 - that = (1 + (k - 2)/3) / k, and the first always does."""
    assert rungs(1, 3, 3) == [1] and rungs(2, 2, 10) == [2, 4, 8] and rungs(4, 2, 4) == []
    go_on = 1 + sum((1 + (k - 2) / 3) / k for k in range(2, n + 1))
    assert stop_evaluations(n, 1, 3, 3) == _rounded([n - go_on, go_on], [1, 3], n)
    assert stop_evaluations(n, 1, 3, 3, enabled=False) == [3] * n


def test_three_rung_stopping_matches_rays_bracket():
    """8 trials, grace 2, eta 2, 10 evaluations (rungs 2, 4, 8): each trial's one score fed, trial after trial,
    through Ray's own ``_Bracket`` at every milestone until it says STOP; the mean stops per milestone over 4000
    orders agree with stop_evaluations' (its own draws), and so do the whole trials."""
    import numpy as np
    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng, milestones, n, draws = np.random.default_rng(123), [2, 4, 8], 8, 4000
    stops = np.zeros(4)
    for _ in range(draws):
        bracket = _Bracket(2, 10, 2, 0)
        for i, score in enumerate(rng.random(n)):
            trial = type("T", (), {"trial_id": str(i)})()
            at = 3
            for k, t in enumerate(milestones):
                if bracket.on_result(trial, t, score) == TrialScheduler.STOP:
                    at = k
                    break
            stops[at] += 1
    expected = list(stops / draws)
    assert expected[3] > 1.0   # more than the nominal eta^-3 share of 8 reach the end: the first always does
    assert stop_evaluations(8, 2, 2, 10) == _rounded(expected, [*milestones, 10], n)


def test_search_estimate_by_hand():
    spec = load_space(SPACES / "intra_domain_cpu_search.yaml")  # 4 methods, eval every 50 of 150 steps, ASHA rf 3
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, num_trials=24))
    methods = [m.kind for m in spec.methods]
    rates = Rates(train_tokens_per_s=dict.fromkeys(methods, 1000.0),
                  score_s_per_item={m: dict.fromkeys(TASKS, 0.1) for m in [*methods, "zero_shot"]},
                  setup_s=dict.fromkeys(methods, 10.0), tokens_per_example=dict.fromkeys(TASKS, 50.0))
    splits = {t: {"val": 100, "test": 320} for t in TASKS}
    nominal, ceiling, test_s = search_estimate(spec, rates, splits, dict.fromkeys(TASKS, 400), slots=2)
    # a trial of E evaluations: setup 10 + 50 E steps x 32 examples x 50 tokens / 1000 + E x 500 val items x 0.1,
    # plus E gradient-conflict probes of 8 items x 5 tasks x 50 tokens / 1000 = 2 s each: 10 + 132 E;
    # per method 3 trials stop at E = 1 and 3 run E = 3 (stop_evaluations(6, 1, 3, 3), the closed form above)
    assert nominal.train_s == pytest.approx(12 * 82 + 12 * 246) and nominal.score_s == pytest.approx(12 * 50 + 12 * 150)
    zero = 5 * 420 * 0.1
    # 2 slots: the 12 short trials first (852 s each slot), then the 12 long ones (2436 s each slot)
    assert nominal.wall_s == pytest.approx(zero + 12 * 142 / 2 + 12 * 406 / 2)
    assert ceiling.wall_s == pytest.approx(zero + 24 * 406 / 2)
    # twice the methods (8 chosen), the whole test pool each at the mean rate, dealt to the 2 slots: 4 each
    assert test_s == pytest.approx(4 * 5 * 320 * 0.1)
    _, _, test_3 = search_estimate(spec, rates, splits, dict.fromkeys(TASKS, 400), slots=3)
    assert test_3 == pytest.approx(3 * 5 * 320 * 0.1)  # 8 over 3 slots: the longest slot scores 3


def test_calibration_configs_are_each_methods_heaviest_corner():
    spec = load_space(SPACES / "intra_domain_cpu_search.yaml")
    configs = calibration_configs(spec)
    assert configs["lora"]["lora.r"] == 128 and configs["malora"]["malora.r"] == 16
    assert configs["malora"]["malora.top_k"] == 2 and configs["mosld"]["mosld.r"] == 44
