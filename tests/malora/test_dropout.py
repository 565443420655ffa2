"""InputDropout: the dropped positions form a Bernoulli(p) process, the output is unbiased, seeded, and its
gradient is the same mask."""

import math

import pytest
import torch
from torch import nn

from malora.layers.dropout import InputDropout, drop_positions

stats = pytest.importorskip("scipy.stats")  # absent on the GPU machine: skip there, not a collection error


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_positions_are_an_iid_bernoulli_process(p):
    torch.manual_seed(0)
    numel = 400_000
    pos = drop_positions(numel, p)
    assert pos.dtype == torch.int64 and pos.numel() > 0
    assert int(pos[0]) >= 0 and int(pos[-1]) < numel and bool((pos.diff() > 0).all())   # sorted, distinct
    assert stats.binomtest(pos.numel(), numel, p).pvalue > 1e-4
    dropped = torch.zeros(numel, dtype=torch.bool)
    dropped[pos] = True
    # uniform along the index range: each tenth holds Binomial(numel/10, p) drops
    for part in dropped.view(10, -1):
        assert stats.binomtest(int(part.sum()), part.numel(), p).pvalue > 1e-4
    # neighbours independent: P(i and i+1 dropped) = p^2 (a gap distribution off by one would miss this)
    both = int((dropped[:-1] & dropped[1:]).sum())
    assert stats.binomtest(both, numel - 1, p * p).pvalue > 1e-4
    # gaps geometric: P(gap = 1) = p, P(gap = 2) = p (1 - p)
    gaps = pos.diff()
    for g, prob in ((1, p), (2, p * (1 - p))):
        assert stats.binomtest(int((gaps == g).sum()), gaps.numel(), prob).pvalue > 1e-4


def test_a_short_first_block_is_continued_without_bias():
    torch.manual_seed(1)
    numel, p = 200_000, 0.05
    pos = drop_positions(numel, p, margin_sd=-20.0)                  # blocks fall short: several are drawn
    assert int(pos[-1]) < numel and bool((pos.diff() > 0).all())
    assert stats.binomtest(pos.numel(), numel, p).pvalue > 1e-4
    late = int((pos >= numel // 2).sum())                            # the continuation covers the tail evenly
    assert stats.binomtest(late, pos.numel(), 0.5).pvalue > 1e-4


def test_values_are_zero_or_the_unbiased_scale_and_reproducible_by_seed():
    x = torch.randn(512, 256, dtype=torch.float64) + 3.0              # mean 3: a missing 1/(1-p) shows as 2.7
    ours = InputDropout(0.1).train()
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    assert torch.equal(a, ours(x))                                   # same seed, same mask
    assert a.shape == x.shape and a.dtype == x.dtype
    dropped = (a == 0).double().mean().item()
    stock = (nn.Dropout(0.1).train()(x) == 0).double().mean().item()
    sd = math.sqrt(0.1 * 0.9 / x.numel())
    assert abs(dropped - 0.1) < 5 * sd and abs(stock - 0.1) < 5 * sd
    kept = a != 0
    torch.testing.assert_close(a[kept], x[kept] / 0.9, rtol=1e-15, atol=0)
    # unbiased on average: E[a - x | x] = 0, sd of the mean sqrt(mean(x^2) p / (1 - p) / numel) ~ 0.003
    sd_mean = math.sqrt((x ** 2).mean().item() * 0.1 / 0.9 / x.numel())
    assert abs(a.mean().item() - x.mean().item()) < 5 * sd_mean


def test_gradient_is_the_mask_and_eval_is_identity():
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    d = InputDropout(0.25).train()
    torch.manual_seed(0)
    y = d(x)
    g = torch.randn_like(y).t().contiguous().t()                      # a non-contiguous upstream gradient
    y.backward(g)
    mult = torch.where(y != 0, torch.full_like(y, 1 / 0.75), torch.zeros_like(y))  # the multiplier applied
    torch.testing.assert_close(x.grad, g * mult, rtol=1e-15, atol=0)
    xt = torch.randn(32, 64, dtype=torch.float64).t()                 # non-contiguous input
    torch.manual_seed(0)
    yt = d(xt)
    kept = yt != 0
    torch.testing.assert_close(yt[kept], xt[kept] / 0.75, rtol=1e-15, atol=0)
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        InputDropout(1.0)


def test_drop_mask_op_is_the_positions_process():
    """The custom op behind the compiled path keeps exactly the complement of the positions the same seed draws."""
    from malora.layers.dropout import drop_mask

    if drop_mask is None:
        pytest.skip("torch.library.custom_op takes no tags on this torch (< 2.5)")
    torch.manual_seed(5)
    mask = drop_mask(100_000, 0.05, torch.device("cpu"))
    torch.manual_seed(5)
    pos = drop_positions(100_000, 0.05)
    assert mask.dtype == torch.bool and mask.shape == (100_000,)
    assert torch.equal((~mask).nonzero().flatten(), pos)


@pytest.mark.slow
def test_compiled_lora_layer_has_one_graph_and_reuses_its_mask_in_backward():
    """Under torch.compile an adapted linear with input dropout traces into one graph (the drop positions' host read
    stays inside the ``malora::drop_mask`` op; the fused input node steps aside), drops about p of the elements
    with the unbiased scale, and its backward applies the very mask of its forward (a recomputed second draw
    would zero other elements of the gradient)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from malora import LoRAConfig
    from malora.layers import build_adapter_layer
    from malora.layers.dropout import drop_mask

    if drop_mask is None:
        pytest.skip("torch.library.custom_op takes no tags on this torch (< 2.5)")
    n, p, scaling = 16, 0.3, 2.0
    base = nn.Linear(n, n, bias=False)
    nn.init.zeros_(base.weight)                                        # y = scaling * B A dropout(x) alone
    layer = build_adapter_layer(base, LoRAConfig(r=n, alpha=scaling * n, dropout=p)).train()
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(n))
        layer.lora_B.copy_(torch.eye(n))                               # y = scaling * dropout(x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, dynamic=True)
    x = (torch.rand(600, n) + 1.0).requires_grad_()                    # no zeros of its own
    y = compiled(x)
    y.backward(torch.ones_like(y))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    dropped = y == 0
    sd = math.sqrt(p * (1 - p) / y.numel())
    assert abs(dropped.double().mean().item() - p) < 5 * sd
    torch.testing.assert_close(y[~dropped], (scaling / (1 - p)) * x.detach()[~dropped])
    assert torch.equal(x.grad == 0, dropped)                           # the forward's mask, not a new draw
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], scaling / (1 - p)))
