"""Sizing from a pilot's answer-change rate (``statistics.change_rate_mdd`` / ``items_for_mdd``) and its script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from orchestrator.evaluation.statistics import change_rate_mdd, items_for_mdd

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "study_power.py"


def power_at(delta: float, se: float, df: int) -> float:
    """The two-sided 5 % t-test's power at true difference ``delta`` (scipy's noncentral t, computed here)."""
    crit = stats.t.ppf(0.975, df)
    return stats.nct.sf(crit, df, delta / se) + stats.nct.cdf(-crit, df, delta / se)


def test_pool_size_by_hand():
    # q = 0.2, S = 3 (lambda* = 5.65 at df 2): I = 0.2 * 5.65^2 / (2 * 3 * 0.03^2) = 1182 pooled items
    n = items_for_mdd(0.03, 0.2, 3, vs_fixed=True)
    assert n == pytest.approx(0.2 * 5.65 ** 2 / (2 * 3 * 0.03 ** 2), abs=3)
    se = lambda items: math.sqrt(0.2 / (2 * items) / 3)  # noqa: E731  sd of a per-seed Δ vs a fixed reference
    assert power_at(0.03, se(n), 2) >= 0.80 > power_at(0.03, se(n - 1), 2)


def test_method_difference_mdd_by_hand():
    # A - B: var(d_s) = q / I; q = 0.2, I = 1500, S = 3: se = sqrt(0.2 / 1500 / 3) = 0.006667; MDD = 5.65 se = 0.0377
    assert change_rate_mdd(0.2, 1500, 3, vs_fixed=False) == pytest.approx(5.65 * math.sqrt(0.2 / 1500 / 3), rel=2e-3)
    # against a fixed reference half the variance: the MDD shrinks by sqrt(2)
    assert change_rate_mdd(0.2, 1500, 3, vs_fixed=True) == pytest.approx(
        change_rate_mdd(0.2, 1500, 3, vs_fixed=False) / math.sqrt(2))
    with pytest.raises(ValueError, match="2 seeds"):
        change_rate_mdd(0.2, 1500, 1, vs_fixed=False)


def test_variance_model_matches_a_simulation():
    # two runs whose correctness differs on a share q of I items, balanced in direction: var(a - a') = q / I
    rng = np.random.default_rng(0)
    q, items, draws = 0.2, 400, 20_000
    flips = rng.random((draws, items)) < q
    signs = rng.choice([-1.0, 1.0], size=(draws, items))
    diffs = (flips * signs).mean(axis=1)
    assert diffs.var() == pytest.approx(q / items, rel=0.03)


def test_script_reads_a_pilot(tmp_path):
    # methods a, b on tasks x (100 items: 10 % to gold, 10 % from gold) and y (300 items: 5 % + 5 %)
    cell = lambda n, up, down: {"n_items": n, "to_gold": up, "from_gold": down}  # noqa: E731
    per = {"x": cell(100, 0.1, 0.1), "y": cell(300, 0.05, 0.05)}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"methods": {"a": {"learned_per_item": per}, "b": {"learned_per_item": per}}}))
    out = subprocess.run([sys.executable, str(SCRIPT), "--pilot", str(path), "--seeds", "3",
                          "--items-per-task", "300"], capture_output=True, text=True, check=True).stdout
    q = (2 * (0.2 * 100 + 0.1 * 300)) / 800  # 0.125, weighted by items
    assert f"q = {q:.4f}" in out
    pooled = items_for_mdd(0.03, q, 3, vs_fixed=True)
    assert f"{pooled} test items pooled over 2 tasks = {math.ceil(pooled / 2)} per task" in out
    assert f"MALoRA - MoLoRA {change_rate_mdd(q, 600, 3, vs_fixed=False):.4f}" in out
