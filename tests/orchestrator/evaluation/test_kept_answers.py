"""What a trial keeps of each test item so that a study can be recomputed: the gold option and every option's
log-likelihood, equal to a plain forward per option; through the trial's own evaluation path (evaluate_sharded)
and its test metrics."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from orchestrator.data.tasks import load_task
from orchestrator.evaluation.accuracy import evaluate_tasks
from orchestrator.evaluation.metrics import test_metrics as final_test_metrics
from orchestrator.models.loading import build_tiny_llama
from orchestrator.spec.space import load_space
from orchestrator.training.eval_window import evaluate_sharded
from tests.orchestrator.evaluation.test_scoring import _plain_loglik


def test_gold_and_every_options_loglik_are_kept(shared_data_dir):
    model, tok = build_tiny_llama(seed=0)
    _, arc = load_task("arc_e", shared_data_dir)
    items = arc[:4]
    got = evaluate_tasks(model, tok, {"arc_e": items}, batch_size=4, formulation="cloze")["arc_e"]
    assert got.gold == tuple(ex.answer_index for ex in items)
    for ex, kept in zip(items, got.logliks):  # contexts and continuations written out, one plain forward each
        ctx = tok(f"Question: {ex.question}\nAnswer:")["input_ids"]
        plain = [_plain_loglik(model, ctx, tok(f"Question: {ex.question}\nAnswer: {c}")["input_ids"][len(ctx):])
                 for c in ex.choices]
        assert list(kept) == pytest.approx(plain, abs=1e-4)
    # the trial's path: per item gold and logliks beside correct and chosen, into the final report's metrics
    spec = load_space("search_spaces/smoke.yaml")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, formulation="cloze"))
    _, _, per_item = evaluate_sharded(model, tok, {"arc_e": items}, spec, 0, 1, torch.device("cpu"))
    at_length = evaluate_tasks(model, tok, {"arc_e": items}, batch_size=spec.eval.batch_size, formulation="cloze",
                               max_length=spec.data.max_length)["arc_e"]   # the trial scores at data.max_length
    assert per_item["arc_e"]["gold"] == list(got.gold)
    assert per_item["arc_e"]["loglik"] == [pytest.approx(list(x), abs=1e-4) for x in at_length.logliks]
    out = final_test_metrics({"arc_e": {"acc": 0.5, "acc_norm": 0.5, "primary": 0.5}}, per_item)
    assert out["test_gold/arc_e"] == list(got.gold) and len(out["test_loglik/arc_e"]) == 4
