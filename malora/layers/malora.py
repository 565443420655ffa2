"""MALoRA (Wang et al., arXiv 2410.22782, NAACL Findings 2025): experts share a down-projection subspace.

    z = S_A dropout(x)                                                  (T, d), once per token
    y = W x + (alpha/r_bar) sum_{t in TopK} G_t(x) B_t P_t z            G = TopK(softmax(W_g x))

S_A (d, n) shared by the layer's experts, P (N, r_bar, d), B (N, m, r_bar) zero. Initialisation (paper Eqs.
8-10, METHODS.md §1.3): K_t (d, n) Kaiming-uniform; economy SVD K_t = U_t Sigma_t V_t; P_t = (U_t Sigma_t)[:r_bar]
/ beta; S_A = beta V_0. Hence P_t S_A = (U_t Sigma_t)[:r_bar] V_0 does not depend on beta and its rows have the
norms of K_t's first r_bar rows; with ``k0_is_expert`` P_0 S_A = K_0[:r_bar] exactly.

Only the d-dim z (not the n-dim x) is dispatched to experts, which is where the paper's speed comes from.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malora.config import ConfigError
from malora.layers.base import AdapterLayer, Delta, adapter_dtype, choose_dispatch, mixture
from malora.layers.router import Router


def malora_init(n: int, d: int, r_bar: int, num_experts: int, beta: float,
                k0_is_expert: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper init from the global RNG. Returns float64 (S_A (d, n), P (N, r_bar, d), K (N or N+1, d, n)).

    With ``k0_is_expert`` K holds N matrices and expert t uses K_t; otherwise N + 1 and expert t uses K_{t+1}.
    Requires r_bar <= d <= n.
    """
    K = torch.empty(num_experts + (0 if k0_is_expert else 1), d, n)     # (N[+1], d, n)
    for k in K:
        nn.init.kaiming_uniform_(k, a=math.sqrt(5))                     # bound 1/sqrt(n), as LoRA's A
    K = K.double()
    U, S, Vh = torch.linalg.svd(K, full_matrices=False)                 # (.., d, d), (.., d), (.., d, n)
    US = U * S.unsqueeze(-2)                                            # (N[+1], d, d): U_t Sigma_t
    experts = US if k0_is_expert else US[1:]
    P = experts[:, :r_bar] / beta                                       # (N, r_bar, d)
    S_A = beta * Vh[0]                                                  # (d, n)
    return S_A, P, K


class MALoRALinear(AdapterLayer):
    """MALoRA around a frozen linear (in n, out m); S_A x is computed once, before any per-expert work."""

    ROUTED = True

    def __init__(self, base: nn.Module, *, d: int, r_bar: int, num_experts: int, top_k: int, alpha: float,
                 beta: float = 1.0, dropout: float = 0.0, renormalize: bool = False,
                 balance_coef: float = 0.0, balance_reduction: str = "mean", k0_is_expert: bool = True,
                 dispatch: str = "auto") -> None:
        super().__init__(base, scaling=alpha / r_bar, dropout=dropout)
        n, m = self.in_features, self.out_features
        if d > n:
            raise ConfigError(f"MALoRAConfig.d={d} exceeds the in_features {n} of {type(base).__name__}: S_A "
                              f"(d, n) takes d right singular vectors of a (d, n) matrix. Fix: use d <= {n}.")
        self.d, self.r_bar, self.beta, self.k0_is_expert = d, r_bar, beta, k0_is_expert
        self.num_experts, self.top_k, self.dispatch = num_experts, top_k, dispatch
        self.lora_router = Router(n, num_experts, top_k, renormalize=renormalize, balance_coef=balance_coef,
                                  balance_reduction=balance_reduction, device=base.weight.device,
                                  dtype=adapter_dtype(base))
        self.lora_S_A = nn.Parameter(self._new(d, n))                  # (d, n)
        self.lora_P = nn.Parameter(self._new(num_experts, r_bar, d))    # (N, r_bar, d)
        self.lora_B = nn.Parameter(self._new(num_experts, m, r_bar))    # (N, m, r_bar)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_S_A.device.type == "meta":
            return
        S_A, P, _ = malora_init(self.in_features, self.d, self.r_bar, self.num_experts, self.beta,
                                self.k0_is_expert)
        with torch.no_grad():
            self.lora_S_A.copy_(S_A)
            self.lora_P.copy_(P)
            self.lora_B.zero_()

    def resolve_dispatch(self, num_tokens: int) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        n, m = self.in_features, self.out_features
        return choose_dispatch(num_tokens, self.num_experts, self.top_k, self.r_bar * (self.d + m), n * m)

    def down_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.lora_S_A.to(dtype)                                  # (d, n)

    def delta_from(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None,
                   logits: torch.Tensor | None) -> Delta:
        route = self.route(x, rows, logits)                             # gates, idx (T, k)
        # z = S_A dropout(x) (T, d): once per token, shared by every expert
        P, B = self.lora_P.to(x.dtype), self.lora_B.to(x.dtype)
        return mixture(self.resolve_dispatch(x.shape[0]), z, route.gates * self.scaling, route.idx, up=B, down=P,
                       rows=rows)                                       # (T, m); scaled through the (T, k) gates

    def extra_repr(self) -> str:
        return (f"d={self.d}, r_bar={self.r_bar}, beta={self.beta}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, dispatch={self.dispatch}")
