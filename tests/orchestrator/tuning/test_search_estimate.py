"""A search's wall-time estimate: ASHA's rungs and nominal stopping shares, and the makespan by hand."""

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


def test_rungs_and_nominal_stops():
    assert rungs(1, 3, 3) == [1] and rungs(2, 2, 10) == [2, 4, 8] and rungs(4, 2, 4) == []
    # 6 trials, rf 3: 2/3 stop at the first rung, 1/3 run all 3 evaluations
    assert stop_evaluations(6, 1, 3, 3) == [1, 1, 1, 1, 3, 3]
    # 8 trials, rf 2: 1/2 at 2, 1/4 at 4, 1/8 at 8, the rest to 10
    assert stop_evaluations(8, 2, 2, 10) == [2, 2, 2, 2, 4, 4, 8, 10]
    assert stop_evaluations(3, 1, 3, 3, enabled=False) == [3, 3, 3]


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
    # per method 4 trials stop at E = 1 and 2 run E = 3 (stop_evaluations(6, 1, 3, 3))
    assert nominal.train_s == pytest.approx(16 * 82 + 8 * 246) and nominal.score_s == pytest.approx(16 * 50 + 8 * 150)
    zero = 5 * 420 * 0.1
    # 2 slots: the 16 short trials first (1136 s each slot), then the 8 long ones (1624 s each slot)
    assert nominal.wall_s == pytest.approx(zero + 16 * 142 / 2 + 8 * 406 / 2)
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
