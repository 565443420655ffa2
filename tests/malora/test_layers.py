"""Adapter layers against a plain per-token reference, plus router, MALoRA init and DropConnect invariants."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from malora.config import HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig
from malora.inject import inject_adapters
from malora.layers import Router, build_adapter_layer, choose_dispatch, malora_init, switch_balance_loss
from malora.layers.base import gate_matrix
from malora.layers.dropout import InputDropout
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
REGULARISED = {  # input dropout everywhere, plus DropConnect on MoSLD's shared A
    "lora": {"dropout": 0.3}, "molora": {"dropout": 0.3}, "malora": {"dropout": 0.3},
    "mosld": {"dropout": 0.2, "dropconnect": 0.4}, "hydra": {"dropout": 0.3},
}
ROUTED_TOPK = ["molora", "malora", "mosld"]
BUILT_WITH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""layer -> the config it was built from: the reference reads scaling, top-k and renormalisation from there."""


def make_layer(kind: str, dtype=torch.float64, randomize=True, **overrides):
    torch.manual_seed(0)
    base = nn.Linear(N_IN, N_OUT, dtype=dtype)
    cfg = CONFIGS[kind]
    cfg = type(cfg)(**{**cfg.to_dict(), **overrides})
    layer = build_adapter_layer(base, cfg)
    BUILT_WITH[layer] = cfg
    if randomize:  # nonzero B so that wrong formulas show up
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.normal_(0.0, 0.5)
    return layer


class Masks:
    """Records the dropout mask on x and the DropConnect mask on A that the layer's last call drew.

    Each mask M is (kept / (1 - p)), so that the reference applies ``x * M`` (resp. ``A * M``) itself; the
    recorded tensors are checked against that form, so a wrong scale or a mask applied twice shows up.
    """

    def __init__(self, layer) -> None:
        self.layer, self.x, self.A = layer, None, None
        if isinstance(layer.dropout, (nn.Dropout, InputDropout)):
            layer.dropout.register_forward_hook(self._on_dropout)
        if hasattr(layer, "shared_A"):
            original = layer.shared_A

            def shared_A(dtype):
                A = original(dtype)
                self.A = self._mask(layer.lora_A.to(dtype), A, layer.dropconnect)
                return A
            layer.shared_A = shared_A

    def _mask(self, before: torch.Tensor, after: torch.Tensor, p: float) -> torch.Tensor | None:
        if not self.layer.training or p == 0:
            assert torch.equal(before, after)                           # eval: nothing is dropped
            return None
        M = (after != 0).to(before.dtype) / (1.0 - p)
        torch.testing.assert_close(after, before * M, rtol=1e-12, atol=0)
        assert 0.05 < (M == 0).double().mean() < 0.8                    # something is dropped, not everything
        return M

    def _on_dropout(self, module, args, out) -> None:
        p = module.p                                                    # InputDropout or nn.Dropout: p exactly
        self.x = self._mask(args[0], out, p)


def reference(layer, x: torch.Tensor, masks: Masks | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loop over the explicit formula of each method (no stacking, no dispatch).

    ``masks``: the dropout / DropConnect masks a layer call drew (None: no regularisation); ``rows`` (T,) bool:
    real tokens; padded ones get no adapter contribution. The scaling alpha / r (MALoRA: alpha / r_bar), top-k
    and renormalisation come from the config the layer was built from (``BUILT_WITH``), not from the layer.
    """
    kind = type(layer).__name__
    cfg = BUILT_WITH[layer]
    scaling = cfg.alpha / (cfg.r_bar if kind == "MALoRALinear" else cfg.r)
    x_mask = masks.x if masks is not None else None
    A_mask = masks.A if masks is not None else None
    out = []
    for t, xt in enumerate(x.reshape(-1, N_IN)):                      # (n,)
        xd = xt if x_mask is None else xt * x_mask[t]                   # dropout(x): experts only, not the router
        delta = torch.zeros(N_OUT, dtype=x.dtype)
        if rows is not None and not rows[t]:
            pass
        elif kind == "LoRALinear":
            delta = layer.lora_B @ (layer.lora_A @ xd)
        else:
            probs = torch.softmax(layer.lora_router.weight @ xt, -1)
            if kind == "HydraLoRALinear":
                gates, experts = probs, range(layer.num_experts)
            else:
                gates, experts = probs.topk(cfg.top_k)
                if cfg.renormalize:
                    gates = gates / gates.sum()
                experts = experts.tolist()
            A = getattr(layer, "lora_A", None)
            if A_mask is not None:
                A = A * A_mask                                          # DropConnect on the shared A
            for g, e in zip(gates, experts):
                if kind == "MoLoRALinear":
                    expert_out = layer.lora_B[e] @ (layer.lora_A[e] @ xd)
                elif kind == "MALoRALinear":
                    expert_out = layer.lora_B[e] @ (layer.lora_P[e] @ (layer.lora_S_A @ xd))
                else:  # MoSLD and HydraLoRA: shared A, per-expert B
                    expert_out = layer.lora_B[e] @ (A @ xd)
                delta = delta + g * expert_out
        out.append(layer.base.weight @ xt + layer.base.bias + scaling * delta)
    return torch.stack(out).view(*x.shape[:-1], N_OUT)


def forward_and_grads(layer, x, fn):
    """fn(x), dL/dx and dL/d(adapter params) for L = sum(fn(x) * w), w a fixed ramp over the outputs."""
    w = torch.linspace(-1, 1, N_OUT, dtype=x.dtype)
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = fn(x)
    (y * w).sum().backward()
    missing = [n for n, p in layer.adapter_params().items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.adapter_params().items()}


CASES = [(k, d) for k in ROUTED_TOPK for d in ("sparse", "dense", "loop", "auto")] + [("lora", None), ("hydra", None)]


@pytest.mark.parametrize("mode", ["plain", "regularised-train", "regularised-eval"])
@pytest.mark.parametrize("kind, dispatch", CASES)
def test_matches_per_token_reference_values_and_grads(kind, dispatch, mode):
    overrides = {"dispatch": dispatch} if dispatch else {}
    if mode != "plain":
        overrides.update(REGULARISED[kind])
    layer = make_layer(kind, **overrides).train(mode != "regularised-eval")
    # Masks reads the draws off the dropout module, which the fused input side does not call: with dropout on,
    # this checks the separate ops, and tests/malora/test_fused.py checks the fused node against them
    layer.fused_input = mode != "regularised-train"
    masks = Masks(layer)
    x = torch.randn(3, 7, N_IN, dtype=torch.float64)
    y, gx, gp = forward_and_grads(layer, x, layer)
    if mode == "regularised-train":
        assert masks.x is not None and (kind != "mosld" or masks.A is not None)
    else:
        assert masks.x is None and masks.A is None
    y_ref, gx_ref, gp_ref = forward_and_grads(layer, x, lambda x: reference(layer, x, masks))
    assert y.shape == (3, 7, N_OUT)
    assert (y - layer.base(x)).abs().max() > 1e-3                     # the adapter contributes
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
    assert gp.keys() == gp_ref.keys() and len(gp) >= 2
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-10, atol=1e-10, msg=name)


class Holder(nn.Module):
    """The smallest model: one adapted ``proj`` and a forward that takes an attention_mask like an HF model."""

    def __init__(self, cfg) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(N_IN, N_OUT, dtype=torch.float64)
        inject_adapters(self, type(cfg)(**{**cfg.to_dict(), "target_modules": ("proj",)}))
        BUILT_WITH[self.proj] = cfg
        with torch.no_grad():
            for p in self.proj.adapter_params().values():
                p.normal_(0.0, 0.5)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


PAD_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]])  # right and left


def expected_counts(layer, x: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Token-slots per expert over the real rows, by a per-token top-k (argmax for dense routing)."""
    counts = [0] * layer.num_experts
    for xt in x.reshape(-1, N_IN)[rows]:
        probs = torch.softmax(layer.lora_router.weight @ xt, -1)
        for e in (probs.topk(layer.top_k).indices if layer.lora_router.top_k else probs.argmax()[None]).tolist():
            counts[e] += 1
    return counts


@pytest.mark.parametrize("kind, dispatch", [c for c in CASES if c[0] != "lora"])
def test_padded_rows_get_no_delta_no_counts_and_do_not_change_the_loss(kind, dispatch):
    cfg = CONFIGS[kind]
    holder = Holder(type(cfg)(**{**cfg.to_dict(), **({"dispatch": dispatch} if dispatch else {})}))
    layer = holder.proj
    x = torch.randn(3, 7, N_IN, dtype=torch.float64)
    rows = PAD_MASK.reshape(-1).bool()
    y = holder(x, attention_mask=PAD_MASK)
    torch.testing.assert_close(y, reference(layer, x, rows=rows), rtol=1e-10, atol=1e-10)
    assert layer.lora_router.expert_counts.tolist() == expected_counts(layer, x, rows)
    assert layer.lora_router.expert_counts.sum() == int(rows.sum()) * getattr(layer, "top_k", 1)
    if kind == "hydra":
        return
    aux = layer.last_aux_loss
    logits = x.reshape(-1, N_IN) @ layer.lora_router.weight.T
    ref = load_balancing_loss_func((logits,), layer.num_experts, layer.top_k, PAD_MASK)
    torch.testing.assert_close(aux, cfg.balance_coef * ref.double(), rtol=1e-5, atol=0)
    other = torch.randn(3, 7, N_IN, dtype=torch.float64)
    x2 = torch.where(rows.view(3, 7, 1), x, other)                     # same real tokens, other padding
    holder(x2, attention_mask=PAD_MASK)
    torch.testing.assert_close(layer.last_aux_loss, aux, rtol=1e-12, atol=0)
    holder(x)                                                          # no mask: every row is routed
    assert layer.lora_router.expert_counts.sum() == (2 * int(rows.sum()) + 21) * layer.top_k


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


def test_balance_loss_on_hand_built_examples():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
    idx = torch.tensor([[0], [0], [1], [0]])
    # top-1: f = (3/4, 1/4), P = (0.6, 0.4): N * sum f_i P_i = 2 * (0.45 + 0.10) = 1.1
    torch.testing.assert_close(switch_balance_loss(probs, idx, 2), torch.tensor(1.1))
    router = Router(2, 2, top_k=1, balance_coef=0.01)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))                              # logits = x = log(probs)
    route = router(probs.log())
    torch.testing.assert_close(route.probs, probs)
    assert route.idx.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(route.aux_loss, torch.tensor(0.011))
    # top-2 of 3: slots per expert (3, 3, 2) over 4 tokens, so f = (3/4, 3/4, 2/4) sums to k = 2;
    # P = (1.25, 1.55, 1.2) / 4; 3 * (0.75 * 0.3125 + 0.75 * 0.3875 + 0.5 * 0.3) = 2.025
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.15, 0.6], [0.4, 0.5, 0.1]])
    idx = probs.topk(2).indices
    torch.testing.assert_close(switch_balance_loss(probs, idx, 3), torch.tensor(2.025))
    # last token padded: f = (2/3, 2/3, 2/3), P sums to 1, so 3 * 2/3 = 2
    rows = torch.tensor([True, True, True, False])
    torch.testing.assert_close(switch_balance_loss(probs, idx, 3, rows), torch.tensor(2.0))
    uniform = torch.full((4, 2), 0.5)                                  # uniform routing gives k
    torch.testing.assert_close(switch_balance_loss(uniform, torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]]), 2),
                               torch.tensor(2.0))
    assert switch_balance_loss(probs, idx, 3, torch.zeros(4, dtype=torch.bool)) == 0   # no real token


def route_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else mask.reshape(-1).bool()


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_balance_loss_equals_transformers_mixtral_reference(top_k, masked):
    torch.manual_seed(0)
    router = Router(N_IN, 5, top_k=top_k, balance_coef=1.0, dtype=torch.float64)
    x = torch.randn(3 * 7, N_IN, dtype=torch.float64)
    mask = PAD_MASK if masked else None
    route = router(x, route_rows(mask))
    logits = (x @ router.weight.T).detach().requires_grad_(True)
    ref = load_balancing_loss_func((logits,), 5, top_k, mask)          # float32 inside transformers
    torch.testing.assert_close(route.aux_loss, ref.double(), rtol=1e-6, atol=0)
    route.aux_loss.backward()
    ref.backward()
    torch.testing.assert_close(router.weight.grad, logits.grad.T @ x, rtol=1e-5, atol=1e-7)
    scaled = Router(N_IN, 5, top_k=top_k, balance_coef=0.01, dtype=torch.float64)
    scaled.load_state_dict(router.state_dict())
    torch.testing.assert_close(scaled(x, route_rows(mask)).aux_loss, 0.01 * route.aux_loss.detach())


def test_routing_counts_accumulate_reset_and_are_not_buffers():
    layer = make_layer("molora")
    layer(torch.randn(8, N_IN, dtype=torch.float64))
    layer(torch.randn(4, N_IN, dtype=torch.float64))
    frac = layer.lora_router.routing_fraction()
    assert layer.lora_router.expert_counts.sum() == 12 * 2
    torch.testing.assert_close(frac.sum(), torch.tensor(1.0, dtype=frac.dtype))
    layer.lora_router.reset_stats()
    assert torch.all(layer.lora_router.routing_fraction() == 0)
    # DDP broadcasts module buffers from rank 0 before every forward: the counts must not be one
    assert list(layer.named_buffers()) == [] and not any("count" in k for k in layer.state_dict())


def reference_malora_init(n: int, d: int, N: int, k0_is_expert: bool):
    """Paper Eqs. 8-10 written out independently: K_t ~ U(-1/sqrt(n), 1/sqrt(n)) (Kaiming-uniform, a = sqrt(5),
    drawn in order from the global RNG), numpy's SVD. Returns (K, U_t Sigma_t per matrix, V_0)."""
    K = torch.stack([torch.empty(d, n).uniform_(-1 / math.sqrt(n), 1 / math.sqrt(n))
                     for _ in range(N + (0 if k0_is_expert else 1))]).double()
    U, S, Vh = np.linalg.svd(K.numpy(), full_matrices=False)
    return K, torch.from_numpy(U * S[:, None, :]), torch.from_numpy(Vh[0])


def assert_equal_up_to_row_signs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """actual == D expected for a diagonal D of +-1 (singular vectors are defined up to sign)."""
    signs = torch.sign((actual * expected).sum(-1, keepdim=True))
    torch.testing.assert_close(actual, signs * expected)


def check_malora_init(S_A, P, n, d, r_bar, N, beta, k0_is_expert):
    """S_A, P against :func:`reference_malora_init` drawn from the same RNG state (the caller re-seeds)."""
    K, US, V0 = reference_malora_init(n, d, N, k0_is_expert)
    assert_equal_up_to_row_signs(S_A.double() / beta, V0)             # S_A = beta V_0
    experts = US if k0_is_expert else US[1:]                           # (N, d, d)
    for t in range(N):                                                 # P_t = (U_t Sigma_t)[:r_bar] / beta
        assert_equal_up_to_row_signs(P[t].double().T * beta, experts[t][:r_bar].T)
    prod = P.double() @ S_A.double()                                   # (N, r_bar, n)
    K_experts = K if k0_is_expert else K[1:]
    torch.testing.assert_close(prod.norm(dim=-1), K_experts[:, :r_bar].norm(dim=-1))   # Kaiming row scale
    if k0_is_expert:
        torch.testing.assert_close(prod[0], K[0, :r_bar])              # P_0 S_A = K_0[:r_bar], sign-free


@pytest.mark.parametrize("k0_is_expert", [True, False])
def test_malora_init_matches_paper(k0_is_expert):
    n, d, r_bar, N, beta = 16, 8, 5, 3, 1.3
    torch.manual_seed(0)
    S_A, P, K = malora_init(n, d, r_bar, N, beta, k0_is_expert)
    assert S_A.shape == (d, n) and P.shape == (N, r_bar, d) and K.shape == (N + (not k0_is_expert), d, n)
    torch.manual_seed(0)
    check_malora_init(S_A, P, n, d, r_bar, N, beta, k0_is_expert)


def test_malora_layer_uses_paper_init_and_beta_leaves_product_unchanged():
    def build(beta):
        torch.manual_seed(0)
        return MALoRALinear(nn.Linear(N_IN, N_OUT), d=6, r_bar=4, num_experts=3, top_k=2, alpha=8.0, beta=beta)

    small, large = build(0.5), build(2.0)
    torch.testing.assert_close(small.lora_P @ small.lora_S_A, large.lora_P @ large.lora_S_A)
    torch.testing.assert_close(large.lora_S_A, 4 * small.lora_S_A)
    torch.manual_seed(0)
    nn.Linear(N_IN, N_OUT), Router(N_IN, 3, 2)                         # same RNG draws as build() before init
    check_malora_init(small.lora_S_A, small.lora_P, N_IN, 6, 4, 3, 0.5, True)
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
    assert choose_dispatch(800, 8, 2, 8 * (576 + 192), 576 * 192) == "dense"  # SmolLM2 k_proj: 0.44 of the base
    assert choose_dispatch(800, 8, 2, 8 * 8 * (576 + 192), 576 * 192) == "sparse"  # 8 x r64 there: 3.6x the base
    assert choose_dispatch(16, 64, 2, 64 * (n + m), n * m) == "dense"      # too few tokens per expert
