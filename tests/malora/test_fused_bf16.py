"""The fused input side (malora.layers.fused) on a bf16-held base: it is used, and its output and gradients agree
with the separate ops in bf16 and with a float64 run of the same weights.

Tolerance: relative error in the Frobenius norm, ``|a - b| / |b| <= 2e-2``. bf16 keeps 8 significant bits (unit
roundoff 2^-9 ~ 0.2 %); each GEMM accumulates in float32 and rounds its output once, and a gradient passes two or
three such roundings, so errors of ~0.5 % are expected; 2 % leaves margin for the sum over paths, while a wrong or
missing path (a gradient term dropped, a scale applied twice) moves the result by tens of per cent.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from malora import LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.layers import build_adapter_layer

T, N_IN, M_OUT = 45, 32, 24
CONFIGS = {
    "lora": LoRAConfig(r=4, alpha=8.0, dropout=0.3),
    "malora": MALoRAConfig(d=6, r_bar=3, num_experts=4, top_k=2, alpha=6.0, dropout=0.3, balance_coef=0.01),
    "molora": MoLoRAConfig(r=4, num_experts=4, top_k=2, alpha=8.0, dropout=0.3),
    "mosld": MoSLDConfig(r=4, num_experts=3, top_k=2, alpha=8.0, dropout=0.3, dropconnect=0.2),
}
TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bf16_layer(cfg):
    torch.manual_seed(0)
    base = nn.Linear(N_IN, M_OUT, bias=True).to(torch.bfloat16)
    layer = build_adapter_layer(base, cfg).train()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.5)  # nonzero B: every path carries gradient
    return layer


def run(layer, x, grad, *, fused: bool, seed: int = 7):
    layer.fused_input = fused
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)                          # the same dropout positions and masks in both runs
    y = layer(x)
    loss = (y.double() * grad).sum()
    if layer.last_aux_loss is not None:
        loss = loss + layer.last_aux_loss
    loss.backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_fused_bf16_matches_separate_bf16_ops(method):
    layer = bf16_layer(CONFIGS[method])
    x = torch.randn(3, T, N_IN).to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in layer.named_parameters() if "lora_" in n)  # fp32 masters
    assert layer.fused_input_applies(x.reshape(-1, N_IN).requires_grad_()) == (method != "molora")  # MoLoRA has no D
    grad = torch.randn(3, T, M_OUT, dtype=torch.float64)
    ref = run(copy.deepcopy(layer), x, grad, fused=False)
    out = run(copy.deepcopy(layer), x, grad, fused=True)
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.bfloat16
    assert rel(out[0], ref[0]) < TOL and rel(out[1], ref[1]) < TOL
    assert sorted(out[2]) == sorted(ref[2]) and ref[2]
    for name in ref[2]:
        assert out[2][name].dtype == torch.float32, name                # the master weights' gradients
        assert rel(out[2][name], ref[2][name]) < TOL, name


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_fused_bf16_matches_float64(method):
    cfg = CONFIGS[method]
    cfg = dataclasses.replace(cfg, dropout=0.0, **({"dropconnect": 0.0} if method == "mosld" else {}))
    layer = bf16_layer(cfg)
    exact = copy.deepcopy(layer).double()            # the same (bf16-representable) weights, in float64
    x = torch.randn(2, T, N_IN).to(torch.bfloat16)
    grad = torch.randn(2, T, M_OUT, dtype=torch.float64)
    out = run(layer, x, grad, fused=True)
    ref = run(exact, x.double(), grad, fused=False)
    assert rel(out[0], ref[0]) < TOL and rel(out[1], ref[1]) < TOL
    for name in ref[2]:
        assert rel(out[2][name], ref[2][name]) < TOL, name
