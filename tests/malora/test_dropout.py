"""InputDropout: the 16-bit mask is Bernoulli(1 - p') per element, unbiased, seeded, and its gradient is the mask."""

import math

import pytest
import torch
from scipy import stats
from torch import nn

from malora.layers.dropout import LEVELS, InputDropout, keep_multiplier


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_each_of_the_four_16_bit_lanes_keeps_with_probability_one_minus_p(p):
    # one 64-bit draw feeds 4 consecutive elements: a lane with a biased bit (e.g. a sign bit that is always 0,
    # as plain int64 random_() gives) would keep too often in every 4th element
    torch.manual_seed(0)
    m = keep_multiplier((4000, 400), p, dtype=torch.float64)
    p_eff = round(p * LEVELS) / LEVELS
    kept = (m != 0).reshape(-1, 4)                                    # (draws, lane)
    n = kept.shape[0]
    for lane in range(4):
        k = int(kept[:, lane].sum())
        assert stats.binomtest(k, n, 1 - p_eff).pvalue > 1e-4, (lane, k / n)
    # no correlation between lanes of one draw: P(both kept) = (1 - p')^2
    both = int((kept[:, 0] & kept[:, 3]).sum())
    assert stats.binomtest(both, n, (1 - p_eff) ** 2).pvalue > 1e-4


def test_values_are_zero_or_the_unbiased_scale():
    torch.manual_seed(1)
    p = 0.05
    m = keep_multiplier((999, 37), p, dtype=torch.float32)             # numel not a multiple of 4
    p_eff = round(p * LEVELS) / LEVELS
    assert m.shape == (999, 37) and m.dtype == torch.float32
    values = m.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p_eff), rel=1e-7)
    assert abs(p_eff - p) < 0.5 / LEVELS


def test_matches_nn_dropout_in_distribution_and_is_reproducible_by_seed():
    x = torch.randn(512, 256, dtype=torch.float64)
    ours = InputDropout(0.1).train()
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    assert torch.equal(a, ours(x))                                   # same seed, same mask
    dropped = (a == 0).double().mean().item()
    stock = (nn.Dropout(0.1).train()(x) == 0).double().mean().item()
    sd = math.sqrt(0.1 * 0.9 / x.numel())
    assert abs(dropped - 0.1) < 5 * sd and abs(stock - 0.1) < 5 * sd
    kept = a != 0
    torch.testing.assert_close(a[kept], x[kept] / (1 - ours.drop_probability()), rtol=1e-15, atol=0)
    assert abs(a.mean().item() - x.mean().item()) < 0.01              # unbiased on average


def test_gradient_is_the_mask_and_eval_is_identity():
    x = torch.randn(64, 32, dtype=torch.float64, requires_grad=True)
    d = InputDropout(0.25).train()
    torch.manual_seed(0)
    y = d(x)
    g = torch.randn_like(y)
    y.backward(g)
    mult = torch.where(y != 0, y / x.detach(), torch.zeros_like(y))  # the multiplier actually applied
    torch.testing.assert_close(x.grad, g * mult, rtol=1e-12, atol=0)
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        InputDropout(1.0)
