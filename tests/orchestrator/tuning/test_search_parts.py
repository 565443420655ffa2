"""Search pieces without Ray: concurrency sizing, Pareto front, failure reasons, utilisation/seesaw metrics,
and the worker loop itself (bare, LocalSession) including resuming from its own checkpoint."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from orchestrator.report import pareto, tracking
from orchestrator.tuning import plan
from orchestrator.evaluation.metrics import eval_metrics, routing_entropy, utilisation_groups
from orchestrator.spec.space import load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    return load_space(SPACES / "smoke.yaml")


def test_concurrency_fits_trial_slots_into_the_cluster(smoke):
    assert plan.concurrency(smoke, {"CPU": 2.0}) == 2
    assert plan.concurrency(smoke, {"CPU": 16.0}) == 2  # never more than num_trials
    two = dataclasses.replace(smoke, resources=dataclasses.replace(smoke.resources, workers_per_trial=2))
    assert plan.concurrency(two, {"CPU": 2.0}) == 1
    gpu = dataclasses.replace(smoke, search=dataclasses.replace(smoke.search, num_trials=8),
                              resources=dataclasses.replace(smoke.resources, gpus_per_worker=1.0))
    assert plan.concurrency(gpu, {"CPU": 16.0, "GPU": 3.0}) == 3  # GPU-bound
    fixed = dataclasses.replace(smoke, resources=dataclasses.replace(smoke.resources, max_concurrent_trials=1))
    assert plan.concurrency(fixed, {"CPU": 2.0}) == 1


def test_pareto_front_and_best_per_method():
    rows = [{"trial_id": "a", "method": "lora", "val/mean_acc": 0.60, "trainable_params": 100},
            {"trial_id": "b", "method": "malora", "val/mean_acc": 0.70, "trainable_params": 300},
            {"trial_id": "c", "method": "molora", "val/mean_acc": 0.65, "trainable_params": 400},  # dominated by b
            {"trial_id": "d", "method": "lora", "val/mean_acc": 0.55, "trainable_params": 50},
            {"trial_id": "e", "method": "mosld", "val/mean_acc": math.nan, "trainable_params": 10}]
    front = pareto.pareto_front(rows, {"val/mean_acc": "max", "trainable_params": "min"})
    assert [r["trial_id"] for r in front] == ["b", "a", "d"]
    best = pareto.best_per_method(rows)
    assert {r["method"]: r["trial_id"] for r in best} == {"lora": "a", "malora": "b", "molora": "c"}
    assert pareto.markdown_table(front, ("trial_id", "val/mean_acc")).splitlines()[2] == "| b | 0.7000 |"


def test_failure_reason_finds_the_innermost_error():
    text = """Traceback (most recent call last):
  File "x.py", line 1, in f
ray.train.v2.api.exceptions.TrainingFailedError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/orchestrator/training/worker.py", line 230, in run_training
    raise FloatingPointError(...)
FloatingPointError: non-finite loss nan at step 1 (lm 5.97, balance 0.04); lower the lr
"""
    assert tracking.failure_reason(text) == ("FloatingPointError: non-finite loss nan at step 1 "
                                             "(lm 5.97, balance 0.04); lower the lr")
    assert tracking.failure_reason("just a line") == "just a line"


def test_default_tracking_uri_is_sqlite_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(None, None) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert tracking.resolve_tracking_uri(None, None) == "http://127.0.0.1:5055"
    assert tracking.resolve_tracking_uri("sqlite:///x.db", None) == "sqlite:///x.db"
    assert tracking.ui_command("sqlite:///x.db") == (
        "mlflow ui --backend-store-uri sqlite:///x.db --host 127.0.0.1 --port 5000")
    assert tracking.runs_url("sqlite:///x.db", "7") == "http://127.0.0.1:5000/#/experiments/7?workflowType=machine_learning"
    assert tracking.runs_url("https://mlflow.example/", "7") == (
        "https://mlflow.example/#/experiments/7?workflowType=machine_learning")


def test_utilisation_groups_and_entropy():
    fr = {"model.layers.0.self_attn.q_proj": torch.tensor([0.5, 0.5, 0.0, 0.0]),
          "model.layers.1.self_attn.q_proj": torch.tensor([0.25, 0.25, 0.25, 0.25]),
          "model.layers.0.self_attn.v_proj": torch.tensor([1.0, 0.0]),
          "model.layers.1.self_attn.v_proj": torch.tensor([0.25, 0.25, 0.25, 0.25])}
    groups = utilisation_groups(fr)
    assert set(groups) == {"q_proj", "v_proj_n2", "v_proj_n4"}
    assert groups["q_proj"].tolist() == pytest.approx([0.375, 0.375, 0.125, 0.125])
    # layers: H/logN = 0.5, 1.0, 0.0, 1.0 -> mean 0.625
    assert routing_entropy(fr) == pytest.approx(0.625)


def test_eval_metrics_names_and_seesaw():
    acc = {"boolq": 0.6, "arc_e": 0.4}
    util = {"boolq": {"m.0.q_proj": torch.tensor([0.75, 0.25])}, "arc_e": {}}
    m = eval_metrics(acc, util, reference={"boolq": 0.5, "arc_e": 0.5}, history=[{"boolq": 0.55, "arc_e": 0.45}])
    assert m["val/mean_acc"] == pytest.approx(0.5) and m["val/acc/boolq"] == 0.6
    assert m["delta/boolq"] == pytest.approx(0.1) and m["delta/arc_e"] == pytest.approx(-0.1)
    assert m["seesaw/n_regressed"] == 1 and m["seesaw/delta_std"] == pytest.approx(0.1)
    assert m["seesaw_prev/mean_delta"] == pytest.approx(0.0)
    assert m["seesaw/opposite_pair_frac"] == pytest.approx(1.0)  # boolq up, arc_e down
    assert m["util/boolq/q_proj/e0"] == 0.75 and "util_entropy/arc_e" not in m


@pytest.mark.slow  # two tiny trainings, ~3 s
def test_worker_loop_bare_and_resumed_from_its_checkpoint(smoke, tmp_path):
    """The Train worker function without Ray: reports at steps 2 and 4; restarting from the step-2 checkpoint
    (what Ray Train's FailureConfig and --resume do) continues at step 3 and reports only step 4."""
    from orchestrator.training.worker import LocalSession, run_training

    config = {"method": "malora", "malora.r": 4, "malora.num_experts": 4, "malora.top_k": 2, "malora.d": 16,
              "malora.beta": 1.25, "malora.alpha_over_r": 2.0, "malora.target_modules": ["q_proj", "v_proj"],
              "malora.lr": 1.0e-3}
    session = LocalSession(keep_checkpoints=str(tmp_path))
    reports = run_training(smoke, config, session, reference={"boolq": 0.5, "arc_e": 0.5})
    assert [r["step"] for r in reports] == [2, 4]
    first = reports[0]
    assert first["trainable_params"] == 9216 and first["world_size"] == 1 and first["total_steps"] == 4
    assert first["balance_loss"] > 0 and math.isfinite(first["train_loss"])
    assert (tmp_path / "step_000002" / "adapter" / "adapter_config.json").is_file()
    resumed = run_training(smoke, config, LocalSession(resume_dir=str(tmp_path / "step_000002")),
                           reference={"boolq": 0.5, "arc_e": 0.5})
    assert [r["step"] for r in resumed] == [4]
    assert resumed[0]["tokens_total"] == reports[-1]["tokens_total"]
    # the restarted worker reports evaluation 1's val mean too (from its checkpoint), as the first run had it
    assert resumed[0]["val/mean_acc_history"] == [reports[0]["val/mean_acc"], resumed[0]["val/mean_acc"]]
    # killed after its last checkpoint, before Tune recorded the end: the restarted worker trains nothing and
    # reports the final, test-scored metrics of that checkpoint again (else ASHA and the study would get nothing)
    again_session = LocalSession(resume_dir=str(tmp_path / "step_000004"))
    again = run_training(smoke, config, again_session, reference={"boolq": 0.5, "arc_e": 0.5})
    # the expected value is the first run's own final report (held in memory), not the file the restart read
    assert again == again_session.reports == [reports[-1]] and again[0]["step"] == 4
    assert len(again[0]["test_correct/boolq"]) == 8 and 0 <= again[0]["test/mean_acc"] <= 1
    assert again[0]["test/mean_acc"] == sum(sum(again[0][f"test_correct/{t}"]) / 8 for t in ("boolq", "arc_e")) / 2
    # a search trial (score_test=False) scores val only: no test key in any report
    val_only = run_training(smoke, config, LocalSession(), reference={"boolq": 0.5, "arc_e": 0.5}, score_test=False)
    assert [r["step"] for r in val_only] == [2, 4] and not any(k.startswith("test") for r in val_only for k in r)
    assert val_only[-1]["val/mean_acc"] == reports[-1]["val/mean_acc"]  # same seed, same training: same val


@pytest.mark.slow  # one tiny training, ~3 s
def test_chosen_adapter_scored_after_the_search_matches_its_in_training_test_score(smoke, tmp_path):
    """tuning.chosen loads a trial's saved final adapter into a fresh base model and scores test: the per-item hits
    equal those the worker scored on the same adapter in training (score_test=True), a separate code path."""
    from orchestrator.training.worker import LocalSession, run_training
    from orchestrator.tuning.chosen import adapter_test_scores

    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 5.0e-3}
    reports = run_training(smoke, config, LocalSession(keep_checkpoints=str(tmp_path)))
    scores = adapter_test_scores(smoke, {"t": str(tmp_path / "step_000004" / "adapter")})["t"]
    for task in ("boolq", "arc_e"):
        hits = scores[f"test_correct/{task}"]
        assert hits == reports[-1][f"test_correct/{task}"] and len(hits) == 8
    assert scores["test/mean_acc"] == pytest.approx(reports[-1]["test/mean_acc"])


def test_chosen_adapters_are_dealt_to_the_slots_each_once():
    from orchestrator.tuning.chosen import deal

    adapters = {f"t{i}": f"/a/{i}" for i in range(5)}
    groups = deal(adapters, 2)
    assert groups == [{"t0": "/a/0", "t2": "/a/2", "t4": "/a/4"}, {"t1": "/a/1", "t3": "/a/3"}]
    assert deal(adapters, 8) == [{f"t{i}": f"/a/{i}"} for i in range(5)]  # never an empty task
    assert deal(adapters, 1) == [adapters] and deal({}, 2) == []


@pytest.mark.slow  # two spawned processes build a tiny model each, ~20 s
def test_trials_started_together_each_report_a_rate_and_the_slowdown_follows(smoke):
    """tuning.contention: n spawned trial processes behind one barrier each return their own training rate (real
    tokens/s of the timed steps: finite, positive), and the slowdown is the alone rate over their mean."""
    from orchestrator.tuning.contention import concurrent_rates, measure_slowdown

    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 5.0e-3}
    rates = concurrent_rates(smoke, config, steps=2, n=2)
    assert len(rates) == 2 and all(math.isfinite(r) and r > 0 for r in rates)
    measured = measure_slowdown(smoke, config, steps=2, slots=2)
    assert measured["slowdown"] == pytest.approx(max(1.0, measured["alone"] / (sum(measured["together"]) / 2)))
    assert len(measured["together"]) == 2 and measured["slots"] == 2


@pytest.mark.slow  # the calibration of one tiny method, plus its slowdown in spawned processes, ~40 s
def test_calibration_measures_rates_and_the_slowdown_then_reads_them_back(smoke, tmp_path, monkeypatch):
    from orchestrator.tuning import calibrate

    monkeypatch.setattr(calibrate, "CACHE_DIR", tmp_path)
    configs = {"lora": {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 5.0e-3}}
    rates, meta = calibrate.cached_rates(smoke, configs, steps=2, items=4, slots=2, ray=False)  # Ray: ray-marked
    assert not meta["cached"] and rates.slowdown_slots == 2 and rates.slowdown >= 1.0
    assert rates.ray_cores is None and rates.ray_slowdown == 1.0
    assert rates.train_tokens_per_s["lora"] > 0 and set(rates.score_s_per_item) == {"lora", "zero_shot"}
    assert set(rates.tokens_per_example) == {"boolq", "arc_e"} and rates.setup_s["lora"] > 0
    again, meta2 = calibrate.cached_rates(smoke, configs, steps=2, items=4, slots=2, ray=False)
    assert meta2["cached"] and again == rates
    assert len(list(tmp_path.glob("*.json"))) == 1


def test_trial_rows_keep_the_evaluations_a_restart_dropped_from_tunes_frame(smoke):
    """A trial restarted from its checkpoint: Tune's frame has only the rows of its last launch (evaluation 3);
    the last result's history list brings back evaluations 1 and 2 for the report's common-budget comparisons."""
    import pandas as pd

    from orchestrator.report.summary import trial_rows

    last = {"trial_id": "t1", "step": 6, "total_steps": 6, "evaluations": 3, "val/mean_acc": 0.6,
            "val/mean_acc_history": [0.4, 0.5, 0.6]}
    result = SimpleNamespace(metrics=last, path="/x/trial_t1", config={"method": "lora", "lora.r": 4},
                             error=None, checkpoint=None, metrics_dataframe=pd.DataFrame([last]))
    (row,) = trial_rows([result], smoke)
    assert row["val_history"] == {1: 0.4, 2: 0.5, 3: 0.6} and row["status"] == "TERMINATED"
    assert row["best val/mean_acc"] == 0.6


def test_trial_rows_leave_out_a_trial_whose_config_tune_has_not_written_yet(smoke, caplog):
    """A report read while a trial starts: its config is still empty. With two methods in the space, reading it as
    the first (lora) would put a malora trial in lora's rows; it is left out, and the log says which."""
    from orchestrator.report.summary import trial_rows

    assert len(smoke.methods) > 1
    last = {"trial_id": "t2", "step": 0, "total_steps": 6}
    started = SimpleNamespace(metrics=last, path="/x/trial_t2", config={}, error=None, checkpoint=None,
                              metrics_dataframe=None)
    known = SimpleNamespace(metrics={"trial_id": "t3", "step": 6, "total_steps": 6, "val/mean_acc": 0.5},
                            path="/x/trial_t3", config={"method": "malora"}, error=None, checkpoint=None,
                            metrics_dataframe=None)
    with caplog.at_level("WARNING"):
        rows = trial_rows([started, known], smoke)
    assert [(r["trial_id"], r["method"]) for r in rows] == [("t3", "malora")]
    assert "t2" in caplog.text
