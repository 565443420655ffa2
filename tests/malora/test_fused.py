"""The fused input side (malora.layers.fused) against the same layer run as separate ops (``fused_input = False``),
at float64 with the same random draws: outputs and every gradient agree, and the node saves no (T, n) copy of
the dropped input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from malora import HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.layers import build_adapter_layer
from malora.layers.fused import FrozenRouterDown

T, N_IN, M_OUT = 37, 24, 20
CONFIGS = {
    "lora": LoRAConfig(r=4, alpha=8.0, dropout=0.3),
    "malora": MALoRAConfig(d=6, r_bar=3, num_experts=4, top_k=2, alpha=6.0, dropout=0.3, balance_coef=0.01),
    "malora_sparse": MALoRAConfig(d=6, r_bar=3, num_experts=4, top_k=2, alpha=6.0, dropout=0.3, dispatch="sparse"),
    "mosld": MoSLDConfig(r=4, num_experts=3, top_k=2, alpha=8.0, dropout=0.3, dropconnect=0.2),
    "hydra": HydraLoRAConfig(r=4, num_experts=3, alpha=8.0, dropout=0.3),
    "lora_p0": LoRAConfig(r=4, alpha=8.0, dropout=0.0),
}


def _layer(cfg, conv1d: bool, bias: bool):
    torch.manual_seed(0)
    if conv1d:
        base = Conv1D(M_OUT, N_IN).double()
        nn.init.normal_(base.weight)
        if not bias:
            base.bias = None
    else:
        base = nn.Linear(N_IN, M_OUT, bias=bias).double()
    layer = build_adapter_layer(base, cfg).double().train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)  # nonzero B: every path carries gradient
    return layer


def _run(layer, x, grad, fused: bool, seed: int = 7):
    layer.fused_input = fused
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)                 # the same dropout positions and DropConnect masks in both runs
    y = layer(x)
    loss = (y * grad).sum()
    if layer.last_aux_loss is not None:
        loss = loss + layer.last_aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), (x.grad.clone() if x.requires_grad else None), grads


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("conv1d,bias", [(False, False), (False, True), (True, True)])
def test_fused_input_matches_separate_ops(method, conv1d, bias):
    layer = _layer(CONFIGS[method], conv1d, bias)
    assert layer.fused_input_applies(torch.zeros(1, N_IN, dtype=torch.float64))
    x = torch.randn(3, T, N_IN, dtype=torch.float64, requires_grad=True)  # (B, S, n): the reshape is exercised
    grad = torch.randn(3, T, M_OUT, dtype=torch.float64)
    ref = _run(copy.deepcopy(layer), x, grad, fused=False)
    out = _run(copy.deepcopy(layer), x, grad, fused=True)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)
    assert sorted(out[2]) == sorted(ref[2]) and ref[2]           # the same parameters get gradients
    for name in ref[2]:
        torch.testing.assert_close(out[2][name], ref[2][name], rtol=1e-12, atol=1e-12, msg=name)


def test_input_without_grad_and_padding_rows():
    """A first layer's input needs no gradient (frozen embeddings): the node computes no dx; routing still sees
    the fused logits (counts and balance loss as the separate path)."""
    layer = _layer(CONFIGS["malora"], False, True)
    x = torch.randn(T, N_IN, dtype=torch.float64)
    grad = torch.randn(T, M_OUT, dtype=torch.float64)
    ref_layer, out_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    ref = _run(ref_layer, x, grad, fused=False)
    out = _run(out_layer, x, grad, fused=True)
    assert out[1] is None and ref[1] is None
    for name in ref[2]:
        torch.testing.assert_close(out[2][name], ref[2][name], rtol=1e-12, atol=1e-12, msg=name)
    assert torch.equal(out_layer.lora_router.expert_counts, ref_layer.lora_router.expert_counts)
    torch.testing.assert_close(out_layer.last_aux_loss, ref_layer.last_aux_loss)


def test_fusion_only_where_it_applies():
    x = torch.zeros(2, N_IN)
    lora = build_adapter_layer(nn.Linear(N_IN, M_OUT), LoRAConfig(r=2))
    assert lora.fused_input_applies(x)
    with torch.no_grad():
        assert not lora.fused_input_applies(x)                            # nothing to differentiate: plain ops
    assert not build_adapter_layer(nn.Linear(N_IN, M_OUT), MoLoRAConfig(r=2, num_experts=2)).fused_input_applies(x)

    class Custom(nn.Linear):                                      # a subclass may change forward: not fused
        pass
    assert not build_adapter_layer(Custom(N_IN, M_OUT), LoRAConfig(r=2)).fused_input_applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lora.fused_input_applies(x)                            # autocast casts inside: plain ops
    lora.fused_input = False
    assert not lora.fused_input_applies(x)


def test_saves_x_and_positions_not_a_dropped_copy():
    """What the node keeps for backward: x (already kept by any adapter) and the drop positions, never x_d."""
    x = torch.randn(T, N_IN, requires_grad=True)
    w, r, d = torch.randn(M_OUT, N_IN), torch.randn(4, N_IN, requires_grad=True), torch.randn(6, N_IN,
                                                                                                requires_grad=True)
    pos = torch.tensor([0, 5, 100, T * N_IN - 1])
    y, logits, z = FrozenRouterDown.apply(x, w, None, r, d, pos)
    saved = z.grad_fn.saved_tensors
    assert [t.shape for t in saved if t is not None] == [x.shape, w.shape, r.shape, d.shape, pos.shape]
    assert any(t is x or t.data_ptr() == x.data_ptr() for t in saved)
    # and the map is what it says: zeros at the positions before D, gradient zero there too
    xd = x.detach().reshape(-1).clone()
    xd[pos] = 0
    torch.testing.assert_close(z, xd.view(T, N_IN) @ d.T)
    torch.testing.assert_close(logits, x @ r.T)
    (z.sum() + logits.sum() * 0 + y.sum() * 0).backward()
    assert torch.all(x.grad.reshape(-1)[pos] == 0)


def _graph_names(y: torch.Tensor) -> set[str]:
    names, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and type(fn).__name__ not in names:
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


def test_output_graph_has_no_copyslices():
    """The delta is added to the node's (T, m) output before it is viewed as (..., m): in place on the view
    would put a CopySlices node in the graph, which copies the (T, m) gradient in and out at every backward."""
    layer = _layer(CONFIGS["malora"], False, False)
    names = _graph_names(layer(torch.randn(3, T, N_IN, dtype=torch.float64, requires_grad=True)))
    assert "FrozenRouterDownBackward" in names and "CopySlices" not in names, names


LOW_RANK = {  # layers whose delta is h up^T: LoRA, HydraLoRA and the dense mixtures
    "lora": CONFIGS["lora"],
    "hydra": CONFIGS["hydra"],
    "malora_dense": MALoRAConfig(d=6, r_bar=3, num_experts=4, top_k=2, alpha=6.0, dropout=0.3, dispatch="dense"),
    "mosld_dense": MoSLDConfig(r=4, num_experts=3, top_k=2, alpha=8.0, dropout=0.3, dispatch="dense"),
    "molora_dense": MoLoRAConfig(r=4, num_experts=3, top_k=2, alpha=8.0, dropout=0.3, dispatch="dense"),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", sorted(LOW_RANK))
def test_low_rank_delta_is_one_gemm_into_the_frozen_output(kind, fused):
    """A low-rank delta is accumulated into the frozen output by the up-projection GEMM itself (``addmm_``, BLAS
    beta = 1), not written to a fresh (T, m) tensor and added in a second pass (an ``AddBackward0`` in the graph):
    on a bf16 AMX core that add cost more than the frozen GEMM. The sparse path keeps its (T, m) scatter-add."""
    layer = _layer(LOW_RANK[kind], False, True)
    layer.fused_input = fused
    names = _graph_names(layer(torch.randn(3, T, N_IN, dtype=torch.float64, requires_grad=True)))
    assert "AddmmBackward0" in names and "AddBackward0" not in names, names
    assert ("FrozenRouterDownBackward" in names) == (fused and kind != "molora_dense"), names
    sparse = _layer(CONFIGS["malora_sparse"], False, True)
    sparse.fused_input = fused
    assert "AddBackward0" in _graph_names(sparse(torch.randn(3, T, N_IN, dtype=torch.float64, requires_grad=True)))
