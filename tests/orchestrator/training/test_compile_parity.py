"""train.compile: a trial with compiled decoder blocks trains and scores as the same trial in eager code.

fp32 and no adapter dropout, so the two runs see the same arithmetic up to the order of Inductor's sums (the
compiled dropout draws the same positions, but may draw two layers' in the other order: tests/malora/test_compile.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from orchestrator.spec.space import load_space
from orchestrator.training import worker

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.mark.slow  # two tiny trainings with evaluations plus one compilation, ~40 s
def test_a_compiled_trial_trains_and_scores_as_the_eager_one(shared_data_dir, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    smoke = load_space(SPACES / "smoke.yaml")
    config = {"method": "malora", **{f"malora.{k}": v for k, v in {
        "r": 4, "num_experts": 4, "top_k": 2, "d": 16, "beta": 1.25, "alpha_over_r": 2.0, "lr": 1.0e-2,
        "dropout": 0.0}.items()}}
    runs = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        spec = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, precision="fp32", max_steps=6,
                                                                    compile=compiled),
                                   eval=dataclasses.replace(smoke.eval, precision="fp32"))
        runs[compiled] = worker.run_training(spec, config, worker.LocalSession())
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]   # it did compile, whole
    eager, compiled = runs[False], runs[True]
    assert eager[-1]["train_loss"] < eager[0]["train_loss"]                       # it trains
    for e, c in zip(eager, compiled):
        assert c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-4)
        assert c["balance_loss"] == pytest.approx(e["balance_loss"], rel=1e-3)
        for key in (k for k in e if k.startswith(("val/acc/", "test/acc/"))):
            assert c[key] == e[key], key                                            # same answers, same items
