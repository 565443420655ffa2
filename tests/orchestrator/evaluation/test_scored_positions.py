"""Evaluation runs the LM head only at the scored positions: scores equal one-row-at-a-time full logits."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from orchestrator.evaluation import scoring as sc
from orchestrator.models.loading import build_tiny_llama


def gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def reference(model: torch.nn.Module, rows: list[sc.Row]) -> dict[int, float]:
    """Each row alone, unpadded, logits at every position: ``LL = sum_i log p(c_i | ...)``."""
    out = {}
    with torch.no_grad():
        for row in rows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([row.input_ids])).logits[0].double(), -1)
            for req, target in row.targets:
                n = len(target)
                out[req] = float(sum(logp[len(row.input_ids) - n + i, t] for i, t in enumerate(target)))
    return out


@pytest.mark.parametrize("make", [lambda: build_tiny_llama(seed=0)[0], gpt2], ids=["tiny_llama", "gpt2"])
def test_scores_equal_the_full_logits_computation(make):
    torch.manual_seed(0)
    model = make().eval()
    assert sc.lm_parts(model) is not None  # the gathered path is the one under test
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    requests = []
    for ctx_len, cont_lens in [(9, (1, 1, 1)), (4, (3, 1)), (15, (2, 5)), (6, (1, 1)), (11, (4,)), (3, (2, 2, 1))]:
        ctx = rand(ctx_len)
        if len(set(cont_lens)) == 1 and cont_lens[0] == 1:  # label words: one shared row scores every option
            requests.append([(ctx, [t]) for t in rand(len(cont_lens))])
        else:
            requests.append([(ctx, rand(n)) for n in cont_lens])
    rows = sc.build_rows(requests, max_length=64)
    assert any(len(r.targets) > 1 for r in rows) and len({len(r.input_ids) for r in rows}) > 3
    ref = reference(model, rows)
    for batch_size in (1, 3, 16):
        got = sc.continuation_logprobs(model, rows, batch_size=batch_size, pad_id=0)
        assert got.keys() == ref.keys()
        for req in ref:
            assert got[req] == pytest.approx(ref[req], abs=1e-4), (batch_size, req)


def test_a_model_that_caps_its_logits_after_the_head_is_not_split():
    model = build_tiny_llama(seed=0)[0]
    model.config.final_logit_softcapping = 30.0  # a model that caps its logits after the head
    assert sc.lm_parts(model) is None
