"""The search summary chooses on val among completed trials, in the objective's mode, and reports test beside it.

Runs against a real MLflow SQLite store in a temporary folder (no Ray).
"""

from __future__ import annotations

import json
import math

import pytest

from orchestrator.report import summary, tracking
from orchestrator.spec.space import load_space


def _row(trial_id, method, val, test, params, status="TERMINATED"):
    return {"trial_id": trial_id, "method": method, "status": status, "val/mean_acc": val,
            "best val/mean_acc": val, "test/mean_acc": test, "trainable_params": params,
            "trainable_share": params / 1e4, "step": 4, "hparams": {}, "error": ""}


@pytest.fixture()
def store(tmp_path, shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "summary-test")
    parent, _ = tracking.parent_run(uri, exp, "key", "search", reuse=False)
    return uri, parent, load_space("search_spaces/smoke.yaml")


def test_best_and_front_follow_val_not_test_and_skip_early_stopped(store, tmp_path):
    uri, parent, spec = store
    rows = [_row("a", "lora", 0.70, 0.40, 100),   # best on val, worse on test
            _row("b", "lora", 0.60, 0.90, 100),   # best on test: must not be chosen
            _row("c", "malora", 0.50, 0.50, 300),
            _row("d", "malora", 0.95, 0.95, 50, status="STOPPED"),  # early-stopped: listed apart, never chosen
            _row("e", "malora", math.nan, math.nan, 10, status="ERROR")]
    text = summary.finish(uri, parent, spec, rows, tmp_path / "out", 12.0)
    every = text.split("All trials (val only):")[1].split("Best trial per method")[0]
    assert "test" not in every and "| a | lora | TERMINATED | 0.7000 |" in every  # trial rows show val only
    assert "| lora | 2 | 100 | 1.00 % |" in text  # trials, trainable parameters and share per method
    best = text.split("Best trial per method")[1].split("Pareto front")[0]
    assert "| lora | a |" in best and "| b |" not in best and "| malora | c |" in best and "| d |" not in best
    assert "Early-stopped by ASHA (not eligible):" in text and "| malora | d |" in text.split("Early-stopped")[1]
    front = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert [r["trial_id"] for r in front] == ["a"]  # b and c are dominated by a; d is not eligible
    run = tracking.client(uri).get_run(parent)
    assert run.data.metrics["best_val/mean_acc"] == pytest.approx(0.70) and run.info.status == "FINISHED"


def test_min_objective_takes_the_minimum(store, tmp_path):
    import dataclasses

    uri, parent, spec = store
    spec = dataclasses.replace(spec, search=dataclasses.replace(spec.search, objectives={"train_loss": "min"}))
    rows = [dict(_row("a", "lora", 0.7, 0.7, 100), train_loss=2.0), dict(_row("b", "lora", 0.6, 0.6, 100),
                                                                          train_loss=1.0)]
    summary.finish(uri, parent, spec, rows, tmp_path / "out", 1.0)
    assert tracking.client(uri).get_run(parent).data.metrics["best_train_loss"] == pytest.approx(1.0)


def test_summary_to_an_s3_uri_lands_in_the_bucket_and_in_mlflow(store, tmp_path, monkeypatch):
    from orchestrator.cluster import storage
    from tests.orchestrator.s3 import s3_keys, s3_server

    uri, parent, spec = store
    monkeypatch.chdir(tmp_path)
    with s3_server("bucket", tmp_path) as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        summary.finish(uri, parent, spec, [_row("a", "lora", 0.7, 0.4, 100)], "s3://bucket/prefix/smoke", 1.0)
        assert s3_keys(env, "bucket") >= {f"prefix/smoke/{f}" for f in ("summary.csv", "summary.md", "pareto.json",
                                                                        "pareto.png")}
        front = json.loads(storage.read_text("s3://bucket/prefix/smoke/pareto.json"))
    assert [r["trial_id"] for r in front] == ["a"]
    assert not (tmp_path / "s3:").exists()  # the old Path("s3://...") bug: a local folder named "s3:"
    arts = {a.path for a in tracking.client(uri).list_artifacts(parent, "summary")}
    assert {"summary/summary.csv", "summary/pareto.json"} <= arts
