"""MoSLD (Zhao et al., arXiv 2412.08946, COLING 2025): experts share A, with DropConnect on A.

    A~ = (mask * A) / (1 - p),   mask ~ Bernoulli(1 - p) per weight, fresh each training forward; A~ = A in eval
    y  = W x + (alpha/r) sum_{k in TopK} S^k(x) B_k A~ dropout(x)

A (r, n) Kaiming-uniform (the paper says "random Gaussian" without a scale; Kaiming keeps LoRA's scale), B (N,
m, r) zero, S = renormalised top-k of softmax(W_g x) by default (paper Eq. 1). The shared matrix is the
input-side A (METHODS.md §2.1). The number of experts may differ per layer (set by injection).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malora.layers.base import AdapterLayer, Delta, adapter_dtype, choose_dispatch, mixture
from malora.layers.router import Router


class MoSLDLinear(AdapterLayer):
    """Shared-A mixture with top-k routing and DropConnect on A, around a frozen linear (in n, out m)."""

    ROUTED = True

    def __init__(self, base: nn.Module, *, r: int, num_experts: int, top_k: int, alpha: float,
                 dropconnect: float = 0.0, dropout: float = 0.0, renormalize: bool = True,
                 balance_coef: float = 0.0, balance_reduction: str = "mean", dispatch: str = "auto") -> None:
        super().__init__(base, scaling=alpha / r, dropout=dropout)
        self.r, self.num_experts, self.top_k, self.dispatch = r, num_experts, top_k, dispatch
        self.dropconnect = dropconnect
        n, m = self.in_features, self.out_features
        self.lora_router = Router(n, num_experts, top_k, renormalize=renormalize, balance_coef=balance_coef,
                                  balance_reduction=balance_reduction, device=base.weight.device,
                                  dtype=adapter_dtype(base))
        self.lora_A = nn.Parameter(self._new(r, n))                     # (r, n) shared by the experts
        self.lora_B = nn.Parameter(self._new(num_experts, m, r))        # (N, m, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def shared_A(self, dtype: torch.dtype) -> torch.Tensor:
        """A~ (r, n): DropConnect-masked and rescaled in training, A itself in eval."""
        A = self.lora_A.to(dtype)
        p = self.dropconnect
        if self.training and p > 0:
            mask = torch.empty_like(A).bernoulli_(1.0 - p)              # (r, n) fresh per forward
            A = A * mask / (1.0 - p)
        return A

    def resolve_dispatch(self, num_tokens: int) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        n, m = self.in_features, self.out_features
        return choose_dispatch(num_tokens, self.num_experts, self.top_k, self.r * m, n * m)

    def down_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.shared_A(dtype)                                     # (r, n), DropConnect in training

    def delta_from(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None,
                   logits: torch.Tensor | None) -> Delta:
        route = self.route(x, rows, logits)                             # gates, idx (T, k)
        return mixture(self.resolve_dispatch(x.shape[0]), z, route.gates * self.scaling, route.idx,
                       up=self.lora_B.to(x.dtype), rows=rows)           # (T, m)

    def extra_repr(self) -> str:
        return (f"r={self.r}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"dropconnect={self.dropconnect}, dispatch={self.dispatch}")
