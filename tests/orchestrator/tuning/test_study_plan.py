"""The study's choice and plan on hand-built inputs (no Ray): configs_from_search, plan_runs, replicate seeds
disjoint from the search's, and the recorded plan that --resume reads and checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.spec.space import load_space
from orchestrator.tuning import record, study

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space(SPACES / "smoke.yaml")
    return dataclasses.replace(spec, storage_path=str(tmp_path))


def _trial(status, config, **last):
    return SimpleNamespace(status=status, config=config, last_result=last)


def test_configs_from_search_takes_the_best_complete_trial_per_method(smoke, monkeypatch):
    trials = [
        _trial("TERMINATED", {"method": "lora", "lora.r": 4}, **{"val/mean_acc": 0.50, "step": 4, "total_steps": 4}),
        _trial("TERMINATED", {"method": "lora", "lora.r": 8}, **{"val/mean_acc": 0.70, "step": 4, "total_steps": 4}),
        # early-stopped with a better part-budget score: not eligible
        _trial("TERMINATED", {"method": "lora", "lora.r": 8, "lora.lr": 0.1},
               **{"val/mean_acc": 0.95, "step": 2, "total_steps": 4}),
        _trial("ERROR", {"method": "malora", "malora.d": 8}, **{"val/mean_acc": 0.99, "step": 4, "total_steps": 4}),
        _trial("TERMINATED", {"method": "malora", "malora.d": 16}, **{"val/mean_acc": float("nan"), "step": 4,
                                                                        "total_steps": 4}),
        _trial("TERMINATED", {"method": "malora", "malora.d": 8}, **{"val/mean_acc": 0.60, "step": 4,
                                                                       "total_steps": 4}),
    ]
    monkeypatch.setattr("ray.tune.ExperimentAnalysis", lambda path: SimpleNamespace(trials=trials))
    assert study.configs_from_search(smoke, "x") == {"lora": {"method": "lora", "lora.r": 8},
                                                      "malora": {"method": "malora", "malora.d": 8}}
    low = dataclasses.replace(smoke, search=dataclasses.replace(smoke.search, objectives={"val/mean_acc": "min"}))
    assert study.configs_from_search(low, "x")["lora"] == {"method": "lora", "lora.r": 4}
    monkeypatch.setattr("ray.tune.ExperimentAnalysis", lambda path: SimpleNamespace(trials=trials[:3]))
    with pytest.raises(study.StudyError, match="no completed trial for malora"):
        study.configs_from_search(smoke, "x")


def test_replicate_seeds_skip_every_search_seed():
    assert record.replicate_seeds(0, 3, [0]) == [1, 2, 3]
    assert record.replicate_seeds(5, 2, [5, 6, 8]) == [7, 9]
    assert record.replicate_seeds(0, 2, []) == [0, 1]


def test_plan_runs_replicates_then_single_task_references(smoke, monkeypatch):
    configs = {"lora": {"method": "lora", "lora.r": 4}, "malora": {"method": "malora", "malora.d": 8}}
    spec = dataclasses.replace(smoke, study=dataclasses.replace(smoke.study, seeds=2, single_task=True,
                                                                single_task_method="lora"))
    monkeypatch.setattr(study, "mixture_counts", lambda s: {"boolq": 30, "arc_e": 10})
    runs = study.plan_runs(spec, configs, search_seeds=[0])
    # seeds 1, 2 (0 trained the search); max_steps 4: boolq ceil(4 * 30 / 40) = 3, arc_e ceil(4 * 10 / 40) = 1
    assert [(r["role"], r["method"], r["seed"], r["task"]) for r in runs] == [
        ("replicate", "lora", 1, None), ("replicate", "lora", 2, None),
        ("replicate", "malora", 1, None), ("replicate", "malora", 2, None),
        ("single_task", "lora", 1, "boolq"), ("single_task", "lora", 2, "boolq"),
        ("single_task", "lora", 1, "arc_e"), ("single_task", "lora", 2, "arc_e")]
    assert [(r["num_train_examples"], r["max_steps"]) for r in runs[4:]] == [(30, 3), (30, 3), (10, 1), (10, 1)]
    assert runs[2]["config"] == configs["malora"] and runs[6]["config"] == configs["lora"]
    single = study.run_spec(spec, runs[6])
    assert (single.data.tasks, single.data.suite, single.data.num_train_examples, single.train.max_steps,
            single.train.seed) == (("arc_e",), None, 10, 1, 1)


def test_a_resume_with_a_changed_space_is_refused(smoke):
    recorded = record.write_plan(smoke, {"seeds": {"search": [0]}})
    assert record.read_plan(smoke) == recorded
    record.check_resume(smoke, recorded, "search")  # the same space: fine
    changed = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, lr=0.5))
    with pytest.raises(record.PlanError, match=r"changed: train;.*Fix: restore the space"):
        record.check_resume(changed, recorded, "search")
    other = dataclasses.replace(smoke, resources=dataclasses.replace(smoke.resources, max_concurrent_trials=1))
    record.check_resume(other, recorded, "search")  # resources are not part of what the runs trained
    # the report's own settings change no run: a resume takes them (the plan recorded the old values)
    report = dataclasses.replace(smoke, study=dataclasses.replace(
        smoke.study, equivalence_margin=0.01, secondary_without=("boolq",), n_boot=500))
    record.check_resume(report, recorded, "study")
    more_seeds = dataclasses.replace(report, study=dataclasses.replace(report.study, seeds=5))
    with pytest.raises(record.PlanError, match=r"changed: study;"):
        record.check_resume(more_seeds, recorded, "study")
    # a plan written before the secondary existed (its study group lacks the key) resumes under this code
    old = {**recorded, "groups": {**recorded["groups"], "study": {
        k: v for k, v in recorded["groups"]["study"].items() if k != "secondary_without"}}}
    record.check_resume(smoke, old, "study")


def test_replicates_never_reuse_a_seed_that_fixed_a_choice(smoke, monkeypatch):
    """The learning-rate probe and the pilot trained at seed 0 (study.choice_seeds), with no search: the
    replicates and the single-task references start at seed 1, and the plan records what was excluded."""
    spec = dataclasses.replace(smoke, study=dataclasses.replace(smoke.study, seeds=2, single_task=True, search=False,
                                                                single_task_method="lora", choice_seeds=(0, 2)))
    monkeypatch.setattr(study, "mixture_counts", lambda s: {"boolq": 10})
    runs = study.plan_runs(spec, {"lora": {"method": "lora"}, "malora": {"method": "malora"}}, search_seeds=[])
    assert sorted({r["seed"] for r in runs}) == [1, 3]


def test_single_task_references_train_at_the_first_single_task_seeds(smoke, monkeypatch):
    spec = dataclasses.replace(smoke, study=dataclasses.replace(smoke.study, seeds=3, single_task=True, search=False,
                                                                single_task_method="lora", single_task_seeds=2))
    monkeypatch.setattr(study, "mixture_counts", lambda s: {"boolq": 10, "arc_e": 10})
    runs = study.plan_runs(spec, {"lora": {"method": "lora"}, "malora": {"method": "malora"}}, search_seeds=[])
    assert [r["seed"] for r in runs if r["role"] == "replicate"] == [0, 1, 2, 0, 1, 2]
    assert [(r["task"], r["seed"]) for r in runs if r["role"] == "single_task"] == [
        ("boolq", 0), ("boolq", 1), ("arc_e", 0), ("arc_e", 1)]


def test_an_interrupted_launch_is_not_reported_as_failed_runs():
    """Ctrl-C during two runs: they end without error and without a test score. The message sends the user to
    --resume, not to a cause that does not exist; a run with an error is still called failed."""
    done = SimpleNamespace(error=None, metrics={"test/mean_acc": 0.5})
    stopped = SimpleNamespace(error=None, metrics={"step": 40})
    broken = SimpleNamespace(error=RuntimeError("boom"), metrics={})
    assert study.unfinished_message([done, stopped, stopped], 10) == \
        "error: 9 of 10 runs unfinished (interrupted or not started): --resume continues them"
    text = study.unfinished_message([done, broken, stopped], 3)
    assert text.startswith("error: 1 of 3 study runs failed (see MLflow): fix the cause") and \
        text.endswith("1 of 3 runs unfinished (interrupted or not started): --resume continues them")
