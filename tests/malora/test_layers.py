"""Adapter layers against a plain per-token reference, plus router, MALoRA init and DropConnect invariants."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from malora.config import HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.layers import Router, build_adapter_layer, choose_dispatch, malora_init, switch_balance_loss
from malora.layers.base import gate_matrix
from malora.layers.malora import MALoRALinear
from malora.layers.mosld import MoSLDLinear

N_IN, N_OUT = 12, 10
CONFIGS = {
    "lora": LoRAConfig(r=4, dropout=0.0),
    "molora": MoLoRAConfig(r=3, num_experts=5, top_k=2, renormalize=True, balance_coef=0.01, dropout=0.0),
    "malora": MALoRAConfig(d=6, r_bar=4, num_experts=5, top_k=2, beta=1.5, balance_coef=0.01, dropout=0.0),
    "mosld": MoSLDConfig(r=3, num_experts=5, top_k=2, dropconnect=0.0, balance_coef=0.01),
    "hydra": HydraLoRAConfig(r=3, num_experts=4, dropout=0.0),
}
ROUTED_TOPK = ["molora", "malora", "mosld"]


def make_layer(kind: str, dtype=torch.float64, randomize=True, **overrides):
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT, dtype=dtype)
    cfg = CONFIGS[kind]
    layer = build_adapter_layer(base, type(cfg)(**{**cfg.to_dict(), **overrides}))
    if randomize:  # nonzero B so that wrong formulas show up
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.normal_(0.0, 0.5)
    return layer


def reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over the explicit formula of each method (no stacking, no dispatch)."""
    kind = type(layer).__name__
    out = []
    for xt in x.reshape(-1, N_IN):                                    # (n,)
        if kind == "LoRALinear":
            delta = layer.lora_B @ (layer.lora_A @ xt)
        else:
            probs = torch.softmax(layer.lora_router.weight @ xt, -1)
            if kind == "HydraLoRALinear":
                gates, experts = probs, range(layer.num_experts)
            else:
                gates, experts = probs.topk(layer.top_k)
                if layer.lora_router.renormalize:
                    gates = gates / gates.sum()
                experts = experts.tolist()
            delta = torch.zeros(N_OUT, dtype=x.dtype)
            for g, e in zip(gates, experts):
                if kind == "MoLoRALinear":
                    expert_out = layer.lora_B[e] @ (layer.lora_A[e] @ xt)
                elif kind == "MALoRALinear":
                    expert_out = layer.lora_B[e] @ (layer.lora_P[e] @ (layer.lora_S_A @ xt))
                else:  # MoSLD and HydraLoRA: shared A, per-expert B
                    expert_out = layer.lora_B[e] @ (layer.lora_A @ xt)
                delta = delta + g * expert_out
        out.append(layer.base.weight @ xt + layer.base.bias + layer.scaling * delta)
    return torch.stack(out).view(*x.shape[:-1], N_OUT)


def grads(layer, x, fn):
    w = torch.linspace(-1, 1, N_OUT, dtype=x.dtype)
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    (fn(x) * w).sum().backward()
    missing = [n for n, p in layer.adapter_params().items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    return x.grad, {n: p.grad.clone() for n, p in layer.adapter_params().items()}


CASES = [(k, d) for k in ROUTED_TOPK for d in ("sparse", "dense", "loop", "auto")] + [("lora", None), ("hydra", None)]


@pytest.mark.parametrize("kind, dispatch", CASES)
def test_matches_per_token_reference_values_and_grads(kind, dispatch):
    layer = make_layer(kind, **({"dispatch": dispatch} if dispatch else {}))
    x = torch.randn(3, 7, N_IN, dtype=torch.float64)
    y = layer(x)
    y_ref = reference(layer, x)
    assert y.shape == (3, 7, N_OUT)
    assert (y - layer.base(x)).abs().max() > 1e-3                     # the adapter contributes
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    gx, gp = grads(layer, x, layer)
    gx_ref, gp_ref = grads(layer, x, lambda x: reference(layer, x))
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    assert gp.keys() == gp_ref.keys() and len(gp) >= 2
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identity_at_init_and_naming(kind):
    layer = make_layer(kind, dtype=torch.float32, randomize=False)
    x = torch.randn(2, 5, N_IN)
    assert torch.equal(layer(x), layer.base(x))
    assert all(name.startswith("lora_") for name in layer.adapter_params())
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(layer.adapter_params())
    assert not any(p.requires_grad for p in layer.base.parameters())


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_low_precision_input(kind):
    layer = make_layer(kind, dtype=torch.float32)
    layer.base.to(torch.bfloat16)                                      # adapter params stay float32
    x = torch.randn(4, 3, N_IN, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 3, N_OUT)
    layer.base.float()
    torch.testing.assert_close(y.float(), layer(x.float()), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ROUTED_TOPK)
@pytest.mark.parametrize("dispatch", ["sparse", "dense", "loop"])
def test_every_adapter_param_gets_a_grad_even_for_idle_experts(kind, dispatch):
    layer = make_layer(kind, dispatch=dispatch)
    with torch.no_grad():                                               # x > 0: experts 0, 1 always win
        layer.lora_router.weight.copy_(-torch.ones_like(layer.lora_router.weight))
        layer.lora_router.weight[:2] = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    x = torch.rand(6, N_IN, dtype=torch.float64) + 0.1
    layer(x).sum().backward()
    assert layer.lora_router.expert_counts.tolist() == [6, 6, 0, 0, 0]
    for name, p in layer.adapter_params().items():
        assert p.grad is not None, name
    assert torch.all(layer.lora_B.grad[2:] == 0) and torch.any(layer.lora_B.grad[:2] != 0)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("kind", ROUTED_TOPK)
def test_top_k_gates(kind, renormalize):
    layer = make_layer(kind, renormalize=renormalize)
    x = torch.randn(20, N_IN, dtype=torch.float64)
    route = layer.lora_router(x)
    G = gate_matrix(route.gates, route.idx, layer.num_experts)       # (T, N)
    assert torch.all((G != 0).sum(-1) == layer.top_k)
    sums = G.sum(-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(20, dtype=torch.float64))
    else:
        torch.testing.assert_close(sums, route.probs.topk(layer.top_k).values.sum(-1))
        assert torch.all(sums < 1)


def test_router_probs_are_float32_for_bf16_and_dense_mode_has_no_aux():
    router = Router(N_IN, 4, top_k=None)
    route = router(torch.randn(5, N_IN, dtype=torch.bfloat16))
    assert route.probs.dtype == torch.float32 and route.gates.dtype == torch.bfloat16
    assert route.idx is None and route.aux_loss is None
    assert router.expert_counts.sum() == 5


def test_balance_loss_on_a_hand_built_example():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    idx = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4), P = (0.6, 0.4): N * sum f_i P_i = 2 * (0.45 + 0.10) = 1.1
    torch.testing.assert_close(switch_balance_loss(probs, idx, 2), torch.tensor(1.1))
    router = Router(2, 2, top_k=1, balance_coef=0.01)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))                              # logits = x = log(probs)
    route = router(probs.log())
    torch.testing.assert_close(route.probs, probs)
    assert route.idx.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(route.aux_loss, torch.tensor(0.011))
    uniform = torch.full((4, 2), 0.5)
    torch.testing.assert_close(switch_balance_loss(uniform, torch.tensor([[0], [1], [0], [1]]), 2), torch.tensor(1.0))


def test_routing_counts_accumulate_and_reset():
    layer = make_layer("molora")
    layer(torch.randn(8, N_IN, dtype=torch.float64))
    layer(torch.randn(4, N_IN, dtype=torch.float64))
    frac = layer.lora_router.routing_fraction()
    assert layer.lora_router.expert_counts.sum() == 12 * 2
    torch.testing.assert_close(frac.sum(), torch.tensor(1.0, dtype=frac.dtype))
    layer.lora_router.reset_stats()
    assert torch.all(layer.lora_router.routing_fraction() == 0)
    assert "expert_counts" not in layer.state_dict().keys().__str__()


@pytest.mark.parametrize("k0_is_expert", [True, False])
def test_malora_init_matches_paper(k0_is_expert):
    n, d, r_bar, N, beta = 16, 8, 5, 3, 1.3
    torch.manual_seed(0)
    S_A, P, K = malora_init(n, d, r_bar, N, beta, k0_is_expert)
    assert S_A.shape == (d, n) and P.shape == (N, r_bar, d) and K.shape == (N + (not k0_is_expert), d, n)
    torch.testing.assert_close(S_A @ S_A.T, beta**2 * torch.eye(d, dtype=S_A.dtype))  # S_A = beta V_0
    assert K.abs().max() <= 1 / math.sqrt(n)                          # Kaiming-uniform bound, as LoRA's A
    prod = P @ S_A                                                     # (N, r_bar, n)
    K_experts = K if k0_is_expert else K[1:]
    torch.testing.assert_close(prod.norm(dim=-1), K_experts[:, :r_bar].norm(dim=-1))
    if k0_is_expert:
        torch.testing.assert_close(prod[0], K[0, :r_bar])
    else:  # K_0 only defines S_A: expert 0's product is not K_1's rows themselves
        assert not torch.allclose(prod[0], K[1, :r_bar], atol=1e-3)


def test_malora_layer_uses_paper_init_and_beta_leaves_product_unchanged():
    def build(beta):
        torch.manual_seed(0)
        return MALoRALinear(nn.Linear(N_IN, N_OUT), d=6, r_bar=4, num_experts=3, top_k=2, alpha=8.0, beta=beta)

    small, large = build(0.5), build(2.0)
    torch.testing.assert_close(small.lora_P @ small.lora_S_A, large.lora_P @ large.lora_S_A)
    torch.testing.assert_close(large.lora_S_A, 4 * small.lora_S_A)
    torch.manual_seed(0)
    nn.Linear(N_IN, N_OUT), Router(N_IN, 3, 2)                         # same RNG draws as build() before init
    S_A, P, _ = malora_init(N_IN, 6, 4, 3, 0.5)
    torch.testing.assert_close(small.lora_S_A, S_A.float())
    torch.testing.assert_close(small.lora_P, P.float())
    assert small.scaling == 8.0 / 4 and torch.all(small.lora_B == 0)


def test_malora_rejects_d_above_in_features():
    with pytest.raises(ValueError, match=r"d=16 exceeds the in_features 12"):
        MALoRALinear(nn.Linear(N_IN, N_OUT), d=16, r_bar=4, num_experts=2, top_k=1, alpha=8.0)


def test_dropconnect_only_in_training():
    layer = make_layer("mosld", dtype=torch.float32, dropconnect=0.5)
    x = torch.randn(6, N_IN)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    A_tilde = layer.shared_A(torch.float32)
    kept = A_tilde != 0
    torch.testing.assert_close(A_tilde[kept], 2 * layer.lora_A[kept])   # rescaled by 1 / (1 - p)
    assert 0.2 < (~kept).float().mean() < 0.8
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    no_drop = MoSLDLinear(nn.Linear(N_IN, N_OUT), r=3, num_experts=5, top_k=2, alpha=16.0, dropconnect=0.0)
    no_drop.load_state_dict(layer.state_dict())
    no_drop.train()                                                    # p = 0: no mask even in training
    torch.testing.assert_close(no_drop(x), y_eval)


def test_choose_dispatch_rule():
    n = m = 4096
    assert choose_dispatch(16384, 8, 2, 8 * (n + m), n * m) == "dense"    # MoLoRA 8 x r8: ~3% of the base
    assert choose_dispatch(16384, 8, 2, 12 * (32 + m), n * m) == "dense"  # MALoRA (12, 32)
    assert choose_dispatch(16384, 64, 2, 64 * (n + m), n * m) == "sparse"  # many wide experts
    assert choose_dispatch(16, 64, 2, 64 * (n + m), n * m) == "dense"      # too few tokens per expert
