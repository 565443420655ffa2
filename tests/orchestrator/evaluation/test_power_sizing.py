"""Sizing a study by power (``statistics.projected_mdd``, ``crossed.components_from_summary``) and its script:
a simulation at the projected MDD finds it in 80 % of studies; the summary-figure components by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.evaluation.crossed import Components, components_from_summary, crossed_se, project_se
from orchestrator.evaluation.statistics import projected_mdd

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "study_power.py"


def test_a_true_difference_of_the_projected_mdd_is_found_four_times_in_five():
    """Continuous paired differences d[t][s, i] = δ + a_s + b_ti + e_tsi with known components (accuracy²):
    5 tasks, 4 seeds x 200 items. At δ = the projected MDD, 2,000 simulated studies reject in 80 % ± 3."""
    rng = np.random.default_rng(0)
    sd_a, sd_b, sd_e, tasks, seeds, items = 0.004, 0.12, 0.15, 5, 4, 200
    comps = Components(sd_a ** 2, (sd_b ** 2,) * tasks, (sd_e ** 2,) * tasks, 0, (items,) * tasks)
    delta = projected_mdd(comps, seeds, items)
    n = 2000
    a = rng.normal(0, sd_a, (n, seeds, 1))
    diffs = [delta + a + rng.normal(0, sd_b, (n, 1, items)) + rng.normal(0, sd_e, (n, seeds, items))
             for _ in range(tasks)]
    mean, se, df, _ = crossed_se(diffs)
    from scipy import stats
    power = float(np.mean(2 * stats.t.sf(np.abs(mean) / se, df) < 0.05))
    assert power == pytest.approx(0.80, abs=0.03)
    # and the projected SE is the spread of the estimate over those studies
    assert project_se(comps, seeds, items)[0] == pytest.approx(float(mean.std()), rel=0.06)


def test_components_from_summary_figures_by_hand():
    # seed SD 0.29 points, item SE 0.25 points at 5 tasks x 320 items: SE² at S, I is 0.29²/S + 0.25² x 320 / I
    comps = components_from_summary(0.0029, 0.0025, 5, 320)
    for seeds, items in ((3, 320), (5, 1000)):
        se, _ = project_se(comps, seeds, items)
        assert se == pytest.approx(math.sqrt(0.0029 ** 2 / seeds + 0.0025 ** 2 * 320 / items))
    assert projected_mdd(comps, 5, 1000) < projected_mdd(comps, 5, 500) < projected_mdd(comps, 3, 500)


def test_the_script_tabulates_and_refuses_bad_input(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--seed-sd", "0.29", "--item-se", "0.25", "--seeds", "3,5",
                          "--items", "320,1000", "--json"], capture_output=True, text=True, check=True).stdout
    got = json.loads(out)
    comps = components_from_summary(0.0029, 0.0025, 5, 320)
    assert got["mdd80_points"]["5x1000"] == pytest.approx(100 * projected_mdd(comps, 5, 1000))
    cheapest = min((s * i, s, i) for s, i in ((3, 320), (3, 1000), (5, 320), (5, 1000))
                   if got["mdd80_points"][f"{s}x{i}"] <= 0.8)
    assert tuple(got["cheapest"]) == cheapest[1:]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--seed-sd", "0.3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--item-se" in bad.stderr
    missing = subprocess.run([sys.executable, str(SCRIPT), "--pilot", str(tmp_path / "none.json")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file" in missing.stderr
