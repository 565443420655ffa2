"""MoLoRA as in MALoRA's baseline (sparse top-k of N LoRA experts; Zadouri et al., ICLR 2024 for the idea):

    y = W x + (alpha/r) sum_{t in TopK} G_t(x) B_t A_t dropout(x),     G = TopK(softmax(W_g x))

A (N, r, n) Kaiming-uniform per expert, B (N, m, r) zero. The router's balance loss is left in
``last_aux_loss`` after each forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malora.layers.base import AdapterLayer, Delta, adapter_dtype, choose_dispatch, mixture
from malora.layers.router import Router


class MoLoRALinear(AdapterLayer):
    """N stacked LoRA experts routed top-k per token around a frozen linear (in n, out m)."""

    ROUTED = True

    def __init__(self, base: nn.Module, *, r: int, num_experts: int, top_k: int, alpha: float,
                 dropout: float = 0.0, renormalize: bool = False, balance_coef: float = 0.0,
                 balance_reduction: str = "mean", dispatch: str = "auto") -> None:
        super().__init__(base, scaling=alpha / r, dropout=dropout)
        self.r, self.num_experts, self.top_k, self.dispatch = r, num_experts, top_k, dispatch
        n, m = self.in_features, self.out_features
        self.lora_router = Router(n, num_experts, top_k, renormalize=renormalize, balance_coef=balance_coef,
                                  balance_reduction=balance_reduction, device=base.weight.device,
                                  dtype=adapter_dtype(base))
        self.lora_A = nn.Parameter(self._new(num_experts, r, n))      # (N, r, n)
        self.lora_B = nn.Parameter(self._new(num_experts, m, r))      # (N, m, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        for a in self.lora_A.data:                                     # per expert: fan_in = n, not r*n
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def resolve_dispatch(self, num_tokens: int) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        n, m = self.in_features, self.out_features
        return choose_dispatch(num_tokens, self.num_experts, self.top_k, self.r * (n + m), n * m)

    def delta(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> Delta:
        route = self.route(x, rows)                                    # gates, idx (T, k)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return mixture(self.resolve_dispatch(x.shape[0]), self.dropout(x), route.gates * self.scaling, route.idx,
                       up=B, down=A, rows=rows)                        # (T, m)

    def extra_repr(self) -> str:
        return f"r={self.r}, num_experts={self.num_experts}, top_k={self.top_k}, dispatch={self.dispatch}"
