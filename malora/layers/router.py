"""Token router shared by the routed adapters: ``G(x) = TopK(softmax(W_g x))`` plus the Switch balance loss.

- logits = W_g x with W_g (N, n), no bias (one router per adapted linear, METHODS.md §1.4);
- probs = softmax(logits) in at least float32 (bf16 softmax over experts is too coarse to rank them);
- top-k: gates (T, k) = the k largest probs, optionally renormalised to sum to 1; idx (T, k) their experts;
- balance loss (Fedus et al., Switch Transformer; MixLoRA): ``coef * N * sum_i f_i P_i`` with f_i the fraction
  of the T*k token-slots sent to expert i and P_i the mean probability of expert i over the T tokens. It is 1 *
  coef under perfectly uniform routing and up to N * coef when one expert takes everything.
- ``top_k=None`` gives dense routing (HydraLoRA): gates = probs (T, N), no idx, no balance loss.

Init: Kaiming-uniform (a = sqrt(5)), the ``nn.Linear`` default that HydraLoRA's router uses; the MALoRA paper
does not specify it. Routing counts (token-slots per expert; for dense routing the argmax head of each token)
accumulate in a non-persistent int64 buffer until ``reset_stats()``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class RouterOutput(NamedTuple):
    gates: torch.Tensor               # (T, k) top-k weights in x.dtype, or (T, N) for dense routing
    idx: torch.Tensor | None          # (T, k) int64 expert ids; None for dense routing
    probs: torch.Tensor               # (T, N) softmax probabilities, float32 or float64
    aux_loss: torch.Tensor | None     # scalar balance_coef * N * sum_i f_i P_i; None for dense routing


def switch_balance_loss(probs: torch.Tensor, idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``N * sum_i f_i P_i``: probs (T, N), idx (T, k) -> scalar (differentiable through probs only)."""
    f = torch.bincount(idx.reshape(-1), minlength=num_experts).to(probs.dtype) / idx.numel()  # (N,)
    return num_experts * (f * probs.mean(0)).sum()


class Router(nn.Module):
    """``W_g`` (N, n) router returning :class:`RouterOutput` for x (T, n)."""

    def __init__(self, in_features: int, num_experts: int, top_k: int | None, renormalize: bool = False,
                 balance_coef: float = 0.0, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.balance_coef = renormalize, balance_coef
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.long, device=device),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight.to(x.dtype))                       # (T, N)
        probs = logits.to(torch.promote_types(x.dtype, torch.float32)).softmax(-1)  # (T, N)
        if self.top_k is None:
            self._count(probs.argmax(-1))
            return RouterOutput(probs.to(x.dtype), None, probs, None)
        top, idx = probs.topk(self.top_k, dim=-1)                           # (T, k), (T, k)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        if x.shape[0] > 0:
            aux = self.balance_coef * switch_balance_loss(probs, idx, self.num_experts)
        else:
            aux = probs.new_zeros(())
        self._count(idx)
        return RouterOutput(top.to(x.dtype), idx, probs, aux)

    @torch.no_grad()
    def _count(self, idx: torch.Tensor) -> None:
        self.expert_counts += torch.bincount(idx.reshape(-1), minlength=self.num_experts)

    def routing_fraction(self) -> torch.Tensor:
        """Fraction (N,) of routed token-slots per expert since the last reset (zeros before any token)."""
        counts = self.expert_counts.double().cpu()
        total = counts.sum()
        return counts / total if total > 0 else counts

    def reset_stats(self) -> None:
        self.expert_counts.zero_()

    def extra_repr(self) -> str:
        k = "dense" if self.top_k is None else f"top_k={self.top_k}, renormalize={self.renormalize}"
        return f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}, {k}"
