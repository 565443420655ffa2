"""Seesaw metrics on hand-computed values."""
from __future__ import annotations

import math

import pytest

from orchestrator.evaluation.seesaw import delta_summary, opposite_pair_fraction, seesaw_metrics, task_deltas

CUR = {"a": 0.6, "b": 0.5, "c": 0.9}
REF = {"a": 0.5, "b": 0.6, "c": 0.7}


def test_deltas_and_summary():
    deltas = task_deltas(CUR, REF)
    assert deltas == pytest.approx({"a": 0.1, "b": -0.1, "c": 0.2})
    s = delta_summary(deltas)
    # mean = 0.2/3; deviations 0.0333, -0.1667, 0.1333 -> variance 0.046667/3 = 0.015556
    assert s["mean_delta"] == pytest.approx(0.2 / 3)
    assert s["min_delta"] == pytest.approx(-0.1) and s["max_delta"] == pytest.approx(0.2)
    assert s["delta_std"] == pytest.approx(math.sqrt(0.14 / 9))
    assert s["n_regressed"] == 1.0 and s["n_regressed_while_improved"] == 1.0


def test_regressions_do_not_count_as_seesaw_when_the_mean_falls():
    s = delta_summary({"a": -0.3, "b": 0.1})
    assert s["n_regressed"] == 1.0 and s["n_regressed_while_improved"] == 0.0


def test_opposite_pair_fraction():
    history = [{"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 1.0, "b": -1.0, "c": 0.0}, {"a": 2.0, "b": 0.0, "c": 1.0}]
    # step 1: a up, b down, c flat -> 1 opposite pair of 3; step 2: all up -> 0; total 1 / (3 pairs * 2 steps)
    assert opposite_pair_fraction(history) == pytest.approx(1 / 6)
    assert opposite_pair_fraction(history[:1]) == 0.0
    assert opposite_pair_fraction([{"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 0.0}]) == 1.0


def test_flat_metric_dict_has_stable_keys():
    m = seesaw_metrics(CUR, REF, history=[REF])
    assert set(m) == {"seesaw/mean_acc", "seesaw/min_acc", "seesaw/mean_delta", "seesaw/min_delta",
                      "seesaw/max_delta", "seesaw/delta_std", "seesaw/n_regressed",
                      "seesaw/n_regressed_while_improved", "seesaw/opposite_pair_frac",
                      "delta/a", "delta/b", "delta/c"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["seesaw/mean_acc"] == pytest.approx(2.0 / 3) and m["seesaw/min_acc"] == 0.5
    # REF -> CUR: a up, b down, c up -> pairs (a,b), (b,c) opposite of 3
    assert m["seesaw/opposite_pair_frac"] == pytest.approx(2 / 3)
    assert seesaw_metrics(CUR, REF)["seesaw/opposite_pair_frac"] == 0.0
    assert seesaw_metrics({"a(b)": 1.0}, {"a(b)": 0.5})["delta/a_b_"] == 0.5  # MLflow-safe key


def test_task_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"only in current: \['d'\]"):
        task_deltas({**CUR, "d": 0.1}, REF)
