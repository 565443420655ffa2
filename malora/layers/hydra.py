"""HydraLoRA (Tian et al., NeurIPS 2024): one shared A, N B-heads mixed densely by a softmax router.

    y = W x + (alpha/r) sum_{i=1..N} softmax(W_g x)_i B_i A dropout(x)

A (r, n) and the router Kaiming-uniform (a = sqrt(5)), B (N, m, r) zero; no top-k, no balance loss
(``last_aux_loss`` stays None). Routing stats count each token's argmax head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malora.layers.base import AdapterLayer, LowRank, adapter_dtype, dense_mixture
from malora.layers.router import Router


class HydraLoRALinear(AdapterLayer):
    """Shared-A, N-head dense mixture around a frozen linear (in n, out m)."""

    ROUTED = True

    def __init__(self, base: nn.Module, *, r: int, num_experts: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, scaling=alpha / r, dropout=dropout)
        self.r, self.num_experts = r, num_experts
        n, m = self.in_features, self.out_features
        self.lora_router = Router(n, num_experts, top_k=None, device=base.weight.device,
                                  dtype=adapter_dtype(base))
        self.lora_A = nn.Parameter(self._new(r, n))                     # (r, n)
        self.lora_B = nn.Parameter(self._new(num_experts, m, r))        # (N, m, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def down_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.lora_A.to(dtype)                                    # (r, n)

    def delta_from(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None,
                   logits: torch.Tensor | None) -> LowRank:
        route = self.route(x, rows, logits)                             # gates = probs (T, N), 0 on padding
        return dense_mixture(z, route.gates * self.scaling, up=self.lora_B.to(x.dtype))  # (T, m), scaled gates

    def extra_repr(self) -> str:
        return f"r={self.r}, num_experts={self.num_experts}"
