"""LoRA (Hu et al., arXiv 2106.09685): ``y = W x + (alpha/r) B A dropout(x)``.

A (r, n) Kaiming-uniform (a = sqrt(5), bound 1/sqrt(n), as PEFT), B (m, r) zero, so a fresh adapter is the
identity.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from malora.layers.base import AdapterLayer, LowRank


class LoRALinear(AdapterLayer):
    """LoRA around a frozen ``nn.Linear`` / ``Conv1D`` with in n, out m."""

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base, scaling=alpha / r, dropout=dropout)
        self.r = r
        self.lora_A = nn.Parameter(self._new(r, self.in_features))    # (r, n)
        self.lora_B = nn.Parameter(self._new(self.out_features, r))   # (m, r)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def down_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.lora_A.to(dtype)                                  # (r, n)

    def delta_from(self, x: torch.Tensor, z: torch.Tensor, rows: torch.Tensor | None,
                   logits: torch.Tensor | None) -> LowRank:
        # z = A dropout(x) (T, r): scaled at width r, not m; the layer adds (z s) B^T into its output
        return LowRank(z * self.scaling, self.lora_B.to(x.dtype))     # delta = (z s) B^T (T, m)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling}"
