"""The per-method Optuna studies live in journal files beside the Tune state: readable by optuna-dashboard (or
``optuna.load_study``) while the search runs, and kept across the pickle round trip Ray's --resume does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna
import pytest

from orchestrator.spec.space import load_space
from orchestrator.tuning.searcher import (PerMethodSearch, dashboard_commands, journal_dir, journal_storage,
                                          study_name)

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_space(SPACES / "smoke.yaml")
    return dataclasses.replace(spec, storage_path=str(tmp_path / "runs"),
                               search=dataclasses.replace(spec.search, num_trials=6))


def stored(spec, method):
    path = journal_dir(spec) / f"{method}.journal"
    return optuna.load_study(study_name=study_name(spec, method), storage=journal_storage(path)).trials


def test_journals_sit_beside_the_tune_state_and_survive_a_resume(smoke, tmp_path):
    folder = journal_dir(smoke)
    assert folder == (tmp_path / "runs" / smoke.name / "optuna").resolve()
    searcher = PerMethodSearch(smoke, max_concurrent=1, journals=folder)
    for i in range(4):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", result={"val/mean_acc": 0.6, "step": 4, "total_steps": 4})
    searcher.save(str(tmp_path / "searcher.pkl"))
    # a reader in another process sees the methods' trials, the completed one with its value
    lora = stored(smoke, "lora")
    State = optuna.trial.TrialState
    assert [t.state for t in lora] == [State.COMPLETE, State.RUNNING] and lora[0].value == 0.6
    assert len(stored(smoke, "malora")) == 2
    # --resume: Ray unpickles the searcher; the journal replays the same file and new results go on to it
    resumed = PerMethodSearch.__new__(PerMethodSearch)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_complete("t2", result={"val/mean_acc": 0.7, "step": 4, "total_steps": 4})
    resumed.suggest("t4")
    lora = stored(smoke, "lora")
    assert [t.state for t in lora] == [State.COMPLETE, State.COMPLETE, State.RUNNING]
    assert [t.value for t in lora[:2]] == [0.6, 0.7]
    assert dashboard_commands(smoke) == [f"optuna-dashboard {folder / 'lora.journal'}",
                                         f"optuna-dashboard {folder / 'malora.journal'}"]


def test_a_uri_storage_keeps_the_studies_in_memory(smoke):
    spec = dataclasses.replace(smoke, storage_path="s3://bucket/runs")
    assert journal_dir(spec) is None and dashboard_commands(spec) == []
