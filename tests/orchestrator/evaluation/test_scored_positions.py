"""Evaluation runs the LM head only at the scored positions: scores equal one-row-at-a-time full logits."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from orchestrator.evaluation import scoring as sc
from orchestrator.models.loading import build_tiny_llama


def gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def reference(model: torch.nn.Module, requests: list[list[tuple[list[int], list[int]]]]) -> dict[int, float]:
    """Each (context, continuation) alone, as one unpadded sequence with logits at every position, in float64:
    ``LL = sum_i log p(c_i | x, c_<i)`` read at positions len(x) - 1 + i. Built from the requests, not the rows."""
    out, flat = {}, 0
    with torch.no_grad():
        for options in requests:
            for ctx, cont in options:
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
                out[flat] = float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
                flat += 1
    return out


def _requests(shared_only: bool = False) -> list[list[tuple[list[int], list[int]]]]:
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(4, 120, (n,), generator=g).tolist()  # noqa: E731
    requests = []
    for ctx_len, cont_lens in [(9, (1, 1, 1)), (4, (3, 1)), (15, (2, 5)), (6, (1, 1)), (11, (4,)), (3, (2, 2, 1)),
                               (7, (3, 6, 2, 4)), (12, (1, 5, 2, 2)), (5, (2, 3, 1, 1))]:
        ctx = rand(ctx_len)
        if len(set(cont_lens)) == 1 and cont_lens[0] == 1:  # label words: one shared row scores every option
            requests.append([(ctx, [t]) for t in rand(len(cont_lens))])
        else:
            requests.append([(ctx, rand(n)) for n in cont_lens])
    if not shared_only:
        requests.append([(rand(6), rand(3)), (rand(8), rand(2))])  # WinoGrande-like: a context per option
    return requests


@pytest.mark.parametrize("make", [lambda: build_tiny_llama(seed=0)[0], gpt2], ids=["tiny_llama", "gpt2"])
def test_scores_equal_the_full_logits_computation(make):
    torch.manual_seed(0)
    model = make().eval()
    assert sc.lm_parts(model) is not None  # the gathered path is the one under test
    requests = _requests()
    rows = sc.build_rows(requests, max_length=64)
    assert any(len(r.targets) > 1 for r in rows) and len({len(r.input_ids) for r in rows}) > 3
    ref = reference(model, requests)
    for batch_size in (1, 3, 16):
        got = sc.continuation_logprobs(model, rows, batch_size=batch_size, pad_id=0)
        assert got.keys() == ref.keys()
        for req in ref:
            assert got[req] == pytest.approx(ref[req], abs=1e-4), (batch_size, req)


@pytest.mark.parametrize("make", [lambda: build_tiny_llama(seed=0)[0], gpt2], ids=["tiny_llama", "gpt2"])
def test_shared_context_cache_scores_equal_one_row_per_option(make):
    """The key/value-cache path (context once, options continued from its cache) gives the log-likelihoods of the
    one-row-per-option path and of the plain full forward, batched across items of different context lengths."""
    torch.manual_seed(0)
    model = make().eval()
    requests = _requests()
    ref = reference(model, requests)
    positions: list[int] = []  # input positions each forward runs (padding included)
    model.register_forward_pre_hook(lambda _m, _a, kw: positions.append(kw["input_ids"].numel()), with_kwargs=True)
    rows = sc.continuation_logprobs(model, sc.build_rows(requests, 64), batch_size=1, pad_id=0)
    row_positions, positions[:] = sum(positions), []
    for batch_size in (1, 2, 16):
        got = sc.shared_context_logprobs(model, requests, batch_size=batch_size, pad_id=0, max_length=64)
        if batch_size == 1:  # unpadded: the contexts ran once per item, not once per option
            assert sum(positions) < row_positions
        assert got.keys() == ref.keys()
        for req in ref:
            assert got[req] == pytest.approx(ref[req], abs=1e-4), (batch_size, req)
            assert got[req] == pytest.approx(rows[req], abs=1e-4), (batch_size, req)


def test_a_model_that_caps_its_logits_after_the_head_is_not_split():
    model = build_tiny_llama(seed=0)[0]
    model.config.final_logit_softcapping = 30.0  # a model that caps its logits after the head
    assert sc.lm_parts(model) is None


class _Bmm(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operand shapes of every ``aten.bmm`` dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes: list[list[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default:
            self.shapes.append([tuple(a.shape) for a in args])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [lambda: build_tiny_llama(seed=0)[0], gpt2], ids=["tiny_llama", "gpt2"])
def test_a_frozen_head_runs_as_one_gemm_not_a_broadcast_bmm(make):
    """Trained adapters leave the head frozen: under no_grad, a 3-D slice ``h[:, -1:]`` of the backbone output
    would make torch.matmul broadcast the (V, H) head to (B, H, V) per batch row and bmm on that copy (7x the
    zero-shot item time at SmolLM2's 49152-token head). No bmm may carry the vocabulary as its last dimension."""
    model = make().eval().requires_grad_(False)
    vocab = model.get_output_embeddings().weight.shape[0]
    requests = [options for options in _requests(shared_only=True)]
    with torch.no_grad(), _Bmm() as seen:
        sc.shared_context_logprobs(model, requests, batch_size=4, pad_id=0, max_length=64)
    assert not [s for s in seen.shapes if s[1][-1] == vocab], seen.shapes
