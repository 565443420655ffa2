"""Equal tuning effort without Ray: one Optuna study per method with equal quotas, and ASHA-stopped trials told
to their study as PRUNED, never as COMPLETE with a part-budget score."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest
from ray.tune.search import Searcher

from orchestrator.spec.space import load_space
from orchestrator.tuning.searcher import PerMethodSearch

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_space(SPACES / "smoke.yaml")
    return dataclasses.replace(spec, search=dataclasses.replace(spec.search, num_trials=6))


def test_each_method_gets_the_same_number_of_trials_from_its_own_study(smoke):
    searcher = PerMethodSearch(smoke, max_concurrent=2)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    assert [c["method"] for c in configs] == ["lora", "malora"] * 3
    assert searcher.suggest("t6") == Searcher.FINISHED
    # the first trial of each method is its points_to_evaluate entry (smoke.yaml), asked of that method's study
    assert configs[0]["lora.r"] == 4 and configs[1]["malora.d"] == 16 and configs[1]["malora.beta"] == 1.25
    assert all(not any(k.startswith("malora.") for k in c) for c in configs[::2])  # lora trials own no malora key
    studies = {k: s._ot_study for k, s in searcher.studies.items()}
    assert [len(studies[k].trials) for k in ("lora", "malora")] == [3, 3]
    assert set(studies["lora"].trials[0].params) == {"lora.r", "lora.lr"}  # no 'method' categorical to favour


def test_early_stopped_trials_are_pruned_not_complete(smoke):
    searcher = PerMethodSearch(smoke, max_concurrent=1)
    for i in range(4):
        searcher.suggest(f"t{i}")
    full = {"val/mean_acc": 0.61, "step": 4, "total_steps": 4, "training_iteration": 2}
    part = {"val/mean_acc": 0.90, "step": 2, "total_steps": 4, "training_iteration": 1}
    searcher.on_trial_result("t0", part)  # lora
    searcher.on_trial_complete("t0", result=full)
    searcher.on_trial_result("t2", part)  # lora, stopped by ASHA after its first evaluation
    searcher.on_trial_complete("t2", result=part)
    searcher.on_trial_complete("t1", result=None, error=True)  # malora, failed
    lora = searcher.studies["lora"]._ot_study.trials
    State = optuna.trial.TrialState
    assert [t.state for t in lora] == [State.COMPLETE, State.PRUNED]
    # Optuna keeps a pruned trial's last intermediate value, and TPE ranks pruned trials below every complete one
    assert lora[0].value == 0.61 and lora[1].intermediate_values == {1: 0.90}
    assert searcher.studies["malora"]._ot_study.trials[0].state == State.FAIL
    assert searcher.pruned == ["t2"]


def test_multi_objective_early_stop_is_pruned_too(smoke):
    spec = dataclasses.replace(smoke, search=dataclasses.replace(
        smoke.search, objectives={"val/mean_acc": "max", "trainable_params": "min"}))
    searcher = PerMethodSearch(spec, max_concurrent=1)
    searcher.suggest("t0"), searcher.suggest("t1"), searcher.suggest("t2")
    searcher.on_trial_complete("t0", result={"val/mean_acc": 0.6, "trainable_params": 10, "step": 4,
                                             "total_steps": 4})
    searcher.on_trial_complete("t2", result={"val/mean_acc": 0.9, "trainable_params": 5, "step": 2,
                                             "total_steps": 4})
    State = optuna.trial.TrialState
    assert [t.state for t in searcher.studies["lora"]._ot_study.trials] == [State.COMPLETE, State.PRUNED]
