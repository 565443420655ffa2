"""The seesaw diagnostics of a trial: routing I(task; expert) metrics with known answers, gradient conflict on a
probe whose tasks are identical, the probe the same at every evaluation and across a resume, and the spec key."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from malora import MoLoRAConfig, inject_adapters
from orchestrator.data.pools import item_key
from orchestrator.data.suites import load_pools
from orchestrator.data.tokenize import collate
from orchestrator.evaluation.diagnostics_record import diagnostics_of
from orchestrator.evaluation.grad_conflict import Probe, conflict_diagnostics, probe_items
from orchestrator.evaluation.routing_metrics import routing_diagnostics, trial_routing_mi
from orchestrator.models.loading import build_tiny_llama
from orchestrator.spec.space import SpaceError, load_space, spec_from_dict
from orchestrator.training import worker
from orchestrator.training.loss import ResponseLoss

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"
ATTN, MLP = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"
MALORA = {"method": "malora", "malora.d": 16, "malora.beta": 1.25, "malora.lr": 1.0e-3}


# ------------------------------------------------------------------------------------------ routing
def test_routing_metrics_of_forced_and_uniform_layers():
    # attention layer (early half): a -> e0, b -> e1 (1 bit); MLP layer (late half): both uniform (0 bits)
    util = {"a": {ATTN: torch.tensor([1.0, 0.0]), MLP: torch.tensor([0.5, 0.5])},
            "b": {ATTN: torch.tensor([0.0, 1.0]), MLP: torch.tensor([0.5, 0.5])}}
    metrics, record = routing_diagnostics(util, ["a", "b"])
    assert metrics["routing/mi"] == pytest.approx(0.5) and metrics["routing/mi_norm"] == pytest.approx(0.5)
    assert metrics["routing/mi/attn_early"] == pytest.approx(1.0)
    assert metrics["routing/mi/mlp_late"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["routing/max_share"] == pytest.approx(0.5)
    assert record["most"]["layer"] == ATTN and record["most"]["share"] == [[1.0, 0.0], [0.0, 1.0]]
    assert record["least"]["layer"] == MLP
    assert trial_routing_mi(metrics) == {"mi": pytest.approx(0.5), "mi_norm": pytest.approx(0.5)}
    assert trial_routing_mi({"val/mean_acc": 0.5}) is None
    assert routing_diagnostics({"a": {}, "b": {}}, ["a", "b"]) == ({}, {})     # LoRA: nothing routed


# ------------------------------------------------------------------------------------------ conflict
def test_identical_tasks_have_cosine_one_in_every_group():
    model, tok = build_tiny_llama(seed=0)
    inject_adapters(model, MoLoRAConfig(r=2, num_experts=3, top_k=2))
    with torch.no_grad():                          # B = 0 would give LoRA A no gradient
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    ids = torch.randint(4, 200, (3, 9), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [{"input_ids": r, "labels": [-100] * 4 + r[4:], "attention_mask": [1] * 9} for r in ids]
    batch = collate(rows, 0)
    probe = Probe(0, {"a": batch, "b": copy.deepcopy(batch)}, {"a": ["k1"], "b": ["k1"]})
    metrics, record = conflict_diagnostics(model, probe, torch.device("cpu"), lambda m, b: ResponseLoss(m)(**b))
    means = {k: v for k, v in metrics.items() if k.startswith("grad_conflict/")}
    assert len(means) >= 10 and all(v == pytest.approx(1.0) for v in means.values())
    assert metrics["grad_cos/a/b"] == pytest.approx(1.0)
    assert record["most_negative"]["all"]["pair"] == ["a", "b"]
    assert record["probe"] == {"seed": 0, "keys": {"a": ["k1"], "b": ["k1"]}}


def test_probe_draws_the_first_items_that_fit_from_the_seeded_order():
    train = {"t": [f"x{i}" for i in range(20)], "u": [f"y{i}" for i in range(5)]}
    fits = lambda task, item: None if item.endswith("3") else {"row": item}   # noqa: E731
    a = probe_items(train, fits, 4, seed=7)
    assert a == probe_items(train, fits, 4, seed=7)
    assert a != probe_items(train, fits, 4, seed=8)
    assert [len(a["t"]), len(a["u"])] == [4, 4]                                # u: 5 items, y3 does not fit
    assert all(not item.endswith("3") for rows in a.values() for item, _ in rows)


# ------------------------------------------------------------------------------------------ a trial
@pytest.fixture()
def smoke(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    return load_space(SPACES / "smoke.yaml")


def test_probe_is_the_same_at_every_evaluation_and_after_a_resume(smoke, tmp_path):
    reports = worker.run_training(smoke, MALORA, worker.LocalSession(keep_checkpoints=str(tmp_path)))
    assert [r["step"] for r in reports] == [2, 4]
    records = [diagnostics_of(r) for r in reports]
    keys = [r["grad_conflict"]["probe"]["keys"] for r in records]
    assert keys[0] == keys[1]
    train = load_pools(smoke).train
    for task, k in keys[0].items():
        assert len(k) == smoke.eval.probe_items and set(k) <= {item_key(ex) for ex in train[task]}
    for r in reports:
        assert 0.0 <= r["routing/mi"] <= 1.0 and math.isfinite(r["grad_conflict/all/mean"])
        assert r["grad_conflict_s"] > 0 and "grad_cos/arc_e/boolq" in r
    resumed = worker.run_training(smoke, MALORA, worker.LocalSession(resume_dir=str(tmp_path / "step_000002")))
    assert [r["step"] for r in resumed] == [4]
    assert diagnostics_of(resumed[0])["grad_conflict"]["probe"]["keys"] == keys[0]
    json.dumps(reports[-1])                                   # the checkpoint's metrics.json takes it


def test_grad_conflict_off_and_a_bad_value_refused(smoke):
    off = dataclasses.replace(smoke, eval=dataclasses.replace(smoke.eval, grad_conflict=False),
                              train=dataclasses.replace(smoke.train, max_steps=2))
    report = worker.run_training(off, MALORA, worker.LocalSession())[-1]
    assert not any(k.startswith(("grad_conflict", "grad_cos")) for k in report)
    assert diagnostics_of(report)["grad_conflict"] == {} and "routing/mi" in report
    raw = yaml.safe_load((SPACES / "smoke.yaml").read_text())
    for value, match in (("yes", r"eval\.grad_conflict: .*bool"), (0, r"eval\.probe_items: 0")):
        bad = copy.deepcopy(raw)
        bad["eval"]["grad_conflict" if value == "yes" else "probe_items"] = value
        with pytest.raises(SpaceError, match=match):
            spec_from_dict(bad, base_dir=SPACES)
    bad = copy.deepcopy(raw)
    bad["eval"]["grad_conflicts"] = False
    with pytest.raises(SpaceError, match=r"eval\.grad_conflicts: unknown key.*grad_conflict"):
        spec_from_dict(bad, base_dir=SPACES)

