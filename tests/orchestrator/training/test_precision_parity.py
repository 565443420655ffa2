"""Loss parity: the same trial on the same batches in bf16 (base held in bfloat16) and in fp32.

Tolerance: every reported window's mean training loss within 0.1 % (relative) of fp32's, and the final val
accuracies within 2 items of 8 per task. bf16 keeps 8 significant bits, so each layer's output is rounded by up to
2^-9 ~ 0.2 % (the loss itself and its log-softmax are float32); the roundings are unbiased and average out over
the batch's positions, and over 8 steps at lr 1e-2 (the loss falls 5.96 -> 5.31) the windows differed by at most
1e-4 relative in runs here. 0.1 % leaves a 10x margin while a wrong precision path (a gradient term lost, the
loss or softmax in bf16, fp16 overflow) moves the loss by far more.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator.spec.space import load_space
from orchestrator.training import worker

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.mark.slow  # two tiny trainings with evaluations, ~15 s
def test_bf16_and_fp32_runs_of_one_trial_stay_within_tolerance(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    smoke = load_space(SPACES / "smoke.yaml")
    config = {"method": "malora", **{f"malora.{k}": v for k, v in {
        "r": 4, "num_experts": 4, "top_k": 2, "d": 16, "beta": 1.25, "alpha_over_r": 2.0, "lr": 1.0e-2}.items()}}
    runs = {}
    for precision in ("bf16", "fp32"):
        spec = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, precision=precision, max_steps=8),
                                   eval=dataclasses.replace(smoke.eval, precision=precision))
        runs[precision] = worker.run_training(spec, config, worker.LocalSession())
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert [r["precision"] for r in bf16] == ["bf16"] * 4 and [r["precision"] for r in fp32] == ["fp32"] * 4
    assert bf16[0]["precision_reason"] == "asked for explicitly; base weights bfloat16"
    assert fp32[0]["eval_precision_reason"] == "asked for explicitly; base weights float32"
    losses = [(b["train_loss"], f["train_loss"]) for b, f in zip(bf16, fp32)]
    print("window losses (bf16, fp32):", losses)
    assert fp32[-1]["train_loss"] < fp32[0]["train_loss"]              # it trains: the comparison means something
    for b, f in losses:
        assert b == pytest.approx(f, rel=1e-3)
    for key in (k for k in fp32[-1] if k.startswith("val/acc/")):
        assert abs(bf16[-1][key] - fp32[-1][key]) <= 2 / 8 + 1e-9, key
