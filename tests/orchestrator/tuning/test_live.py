"""The terminal view: our columns and a best-trial line that works on a conditional space."""

from __future__ import annotations

from ray.tune.experiment import Trial

from orchestrator.spec.space import load_space
from orchestrator.tuning.live import best_trial_line, search_reporter


def _trial(trial_id, config, **result):
    """A real Tune trial (stub: no trainable registered) with ``result`` as its last result."""
    trial = Trial("trainable", config=config, stub=True, trial_id=trial_id)
    trial.run_metadata.last_result = dict(result)
    return trial


def test_best_line_follows_the_mode_and_names_the_method():
    trials = [_trial("a", {"method": "lora", "lora.r": 4}, **{"val/mean_acc": 0.4}),
              _trial("b", {"method": "malora", "malora.d": 16}, **{"val/mean_acc": 0.6}),
              _trial("c", {"method": "lora"})]  # no result yet
    assert best_trial_line(trials, "val/mean_acc", "max") == "Best so far: b (malora) with val/mean_acc=0.6000"
    assert best_trial_line(trials, "val/mean_acc", "min") == "Best so far: a (lora) with val/mean_acc=0.4000"
    assert best_trial_line(trials[2:], "val/mean_acc", "max") is None


def test_search_table_shows_the_objective_and_each_methods_searched_hyperparameters(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    spec = load_space("search_spaces/smoke.yaml")
    reporter = search_reporter(spec)
    assert list(reporter._metric_columns)[:2] == ["val/mean_acc", "val/best_mean_acc"]
    assert list(reporter._parameter_columns) == ["method", "lora.r", "lora.lr", "malora.d", "malora.beta",
                                                 "malora.lr"]
    # (the table itself renders in the smoke search end to end: tests/orchestrator/test_search_e2e.py)
