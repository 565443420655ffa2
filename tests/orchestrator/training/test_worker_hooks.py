"""The worker loop's hooks: train_step through ResponseLoss equals the full-logit step, the padding share of a
window, and the resumed stream of a grouped run."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from malora import LoRAConfig, inject_adapters
from orchestrator.data.tokenize import collate
from orchestrator.models.loading import build_tiny_llama
from orchestrator.spec.space import load_space
from orchestrator.training import worker
from orchestrator.training.loss import ResponseLoss

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


@pytest.fixture()
def smoke(shared_data_dir, monkeypatch):
    monkeypatch.setenv("MALORA_DATA_DIR", str(shared_data_dir))
    return load_space(SPACES / "smoke.yaml")


def items(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        p, r = 3 + i % 5, 1 + i % 3
        ids = torch.randint(4, 300, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "attention_mask": [1] * (p + r)})
    return out


def trial_and_optim(spec):
    model, tok = build_tiny_llama(seed=0)
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.0)
    inject_adapters(model, cfg)
    trial = worker.TrialModel(model, tok, "lora", {}, cfg, None)
    return trial, worker.build_optimisation(trial, spec, steps=4)


def test_train_step_through_response_loss_is_the_full_logit_step_and_counts_padding(smoke):
    data = items(8)
    batches = [collate(data[i:i + 4], 0) for i in (0, 4)]
    positions = sum(b["attention_mask"].numel() for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens < positions  # the batches hold padding
    spec = smoke
    results = []
    for wrap in (lambda m: m, ResponseLoss):  # a bare HF model (its own .loss over all positions), then ours
        torch.manual_seed(0)
        trial, optim = trial_and_optim(spec)
        window = worker.new_window()
        stream = iter([(0, copy.deepcopy(b)) for b in batches])
        for step in range(2):
            worker.train_step(wrap(trial.model), trial, optim, stream, spec, 1, step, window, torch.device("cpu"))
        results.append((window, [p.detach().clone() for p in optim.params]))
    (w_full, p_full), (w_ours, p_ours) = results
    assert w_ours["loss"] == pytest.approx(w_full["loss"], rel=1e-5)
    for a, b in zip(p_ours, p_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert w_ours["positions"] == positions and w_ours["tokens"] == tokens
    assert worker.window_pad_share(w_ours, torch.device("cpu")) == pytest.approx(1 - tokens / positions)


def test_resume_stream_continues_the_grouped_stream(smoke):
    data = items(50)
    tok = SimpleNamespace(pad_token_id=0)
    session = SimpleNamespace(rank=0, world_size=1)
    assert smoke.train.group_by_length  # on by default
    skip = 7 * smoke.train.grad_accum
    full = list(itertools.islice(worker.resume_stream(data, smoke, session, tok, 0), 20))
    resumed = list(itertools.islice(worker.resume_stream(data, smoke, session, tok, 7), 20 - skip))
    assert len(resumed) == 20 - skip
    assert all(a["input_ids"].equal(b["input_ids"]) for (_, a), (_, b) in zip(resumed, full[skip:]))


@pytest.mark.slow  # two tiny trainings, ~6 s
def test_reports_carry_the_padding_share_and_grouping_lowers_it(smoke):
    import dataclasses

    config = {"method": "lora", "lora.r": 4, "lora.alpha_over_r": 2.0, "lora.lr": 1.0e-3}
    shares = {}
    for group in (True, False):
        spec = dataclasses.replace(smoke, train=dataclasses.replace(smoke.train, group_by_length=group, max_steps=2),
                                   data=dataclasses.replace(smoke.data, max_length=512))  # 96 cuts every item to 96
        reports = worker.run_training(spec, config, worker.LocalSession())
        shares[group] = reports[-1]["pad_share"]
    assert 0 <= shares[True] < shares[False] < 1
