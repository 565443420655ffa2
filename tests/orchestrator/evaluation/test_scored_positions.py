"""Packed scoring runs the LM head only at the scored positions: scores equal one-row-at-a-time full logits."""
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
    ctx, common = rand(8), rand(3)  # PIQA-like minimal pairs: options that begin alike share positions
    requests.append([(ctx, common + rand(2)), (ctx, common + rand(1)), (ctx, common[:1] + rand(3)), (ctx, common)])
    if not shared_only:
        requests.append([(rand(6), rand(3)), (rand(8), rand(2))])  # WinoGrande-like: a context per option
    return requests


@pytest.mark.parametrize("make", [lambda: build_tiny_llama(seed=0)[0], gpt2], ids=["tiny_llama", "gpt2"])
def test_packed_scores_equal_the_full_logits_computation(make):
    """Packed rows (contexts once, option segments, several items per row, right-padded batches) give each
    option the log-likelihood of its own plain row, to 1e-4 in fp32."""
    torch.manual_seed(0)
    model = make().eval()
    assert sc.lm_parts(model) is not None  # the gathered path is the one under test
    requests = _requests()
    ref = reference(model, requests)
    lengths = sorted((g.length for g in sc.build_groups(requests)), reverse=True)
    assert len(set(lengths[:3])) > 1  # pack_tokens 1 (a row per group), batch 3: the shorter rows are padded
    for batch_size, pack_tokens in ((1, 1), (3, 1), (16, 1), (1, 30), (4, 30), (16, 256)):
        got = sc.option_logprobs(model, requests, batch_size=batch_size, pad_id=0, pack_tokens=pack_tokens)
        assert got.keys() == ref.keys()
        for req in ref:
            assert got[req] == pytest.approx(ref[req], abs=1e-4), (batch_size, pack_tokens, req)


def test_each_context_runs_once_and_padding_is_not_a_token():
    """The input positions the forwards run: every item's context once plus one per distinct option prefix."""
    model = build_tiny_llama(seed=0)[0].eval()
    requests = _requests()
    sc.lm_parts(model)  # its one probe forward (7 tokens, no mask) before counting
    real: list[int] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: real.append(int(kw["attention_mask"].diagonal(dim1=-2, dim2=-1).sum())), with_kwargs=True)
    sc.option_logprobs(model, requests, batch_size=4, pad_id=0, pack_tokens=16)
    contexts = sum(sum(len(c) for c in {tuple(c) for c, _ in options}) for options in requests)
    # options of one context that begin alike share their first positions: count the distinct prefixes
    prefixes = sum(len({(tuple(c), tuple(k[:i])) for c, k in options for i in range(1, len(k))})
                   for options in requests)
    assert prefixes < sum(len(k) - 1 for options in requests for _, k in options)  # some are shared
    assert sum(real) == contexts + prefixes


def test_long_items_keep_their_continuation_and_bos_and_match_the_truncated_row():
    """Issue 29 items 9-10: an option longer than the room keeps every continuation token and the BOS, losing
    context from the left; the score is that of the row ``[BOS] + context[-keep:] + continuation``."""
    from orchestrator.models.loading import build_tiny_tokenizer

    model = build_tiny_llama(seed=0)[0].eval()
    tok = build_tiny_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ctx = [bos] + list(range(10, 40))                       # 31 tokens, BOS first
    conts = [[50, 51, 52, 53, 54, 55], [60, 61], [70]]
    max_length = 12                                         # room: 12 - len(cont) - 1 (eos) context tokens
    fitted = sc.fit_requests(tok, [[(ctx, c) for c in conts]], max_length)[0]
    for (got_ctx, got_cont), cont in zip(fitted, conts):
        keep = max_length - len(cont) - 1
        assert got_cont == cont and got_ctx == [bos] + ctx[len(ctx) - keep + 1:]   # by hand: BOS + the last keep-1
        assert len(got_ctx) + len(cont) + 1 == max_length
    ref = reference(model, [fitted])
    got = sc.option_logprobs(model, [fitted], batch_size=2, pad_id=0)
    assert got == pytest.approx(ref, abs=1e-4)
    assert len(sc.build_groups([fitted])) == 3  # three cuts, three contexts
    assert eos is not None


def test_an_item_whose_continuation_cannot_fit_is_counted_not_scored(caplog):
    from orchestrator.models.loading import build_tiny_tokenizer

    model = build_tiny_llama(seed=0)[0].eval()
    tok = build_tiny_tokenizer()
    fits = [([5, 6, 7], [8, 9]), ([5, 6, 7], [10])]
    too_long = [([5, 6, 7], [8] * 8), ([5, 6, 7], [10])]   # 8 continuation tokens + eos + 1 context > 9
    with caplog.at_level("WARNING", logger="orchestrator.evaluation.scoring"):
        out = sc.item_logprobs(model, tok, [fits, too_long, fits], max_length=9, batch_size=4, name="arc_e")
    assert out[1] is None and out[0] is not None and out[0] == pytest.approx(out[2])
    assert len(out[0]) == 2
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "arc_e: 1 of 3 items not scored" in record.getMessage() and "[1]" in record.getMessage()


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
        sc.option_logprobs(model, requests, batch_size=4, pad_id=0)
    assert not [s for s in seen.shapes if s[1][-1] == vocab], seen.shapes
