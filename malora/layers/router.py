"""Token router shared by the routed adapters: ``G(x) = TopK(softmax(W_g x))`` plus the balance loss.

- logits = W_g x with W_g (N, n), no bias (one router per adapted linear, METHODS.md §1.4);
- probs = softmax(logits) in at least float32 (bf16 softmax over experts is too coarse to rank them);
- top-k: gates (T, k) = the k largest probs, optionally renormalised to sum to 1; idx (T, k) their experts;
- balance loss (Fedus et al., Switch Transformer, in the form of transformers' Mixtral
  ``load_balancing_loss_func``, which MixLoRA / MoE-PEFT use): over the R real tokens (``rows``; padding is
  excluded everywhere)

      f_i = (1/R) sum_t [i in idx_t]      (N,), token-slots per real token: sums to k
      P_i = (1/R) sum_t probs_{t,i}       (N,), mean router probability
      loss = coef * N * sum_i f_i P_i     = coef * k under perfectly uniform routing

  Differentiable through P only (f is a count). R = 0 gives 0. ``top_k=None`` gives dense routing
  (HydraLoRA): gates = probs (T, N), no idx, no balance loss.

Init: Kaiming-uniform (a = sqrt(5)), the ``nn.Linear`` default that HydraLoRA's router uses; the MALoRA paper
does not specify it. Routing counts (token-slots per expert over real tokens; for dense routing the argmax head
of each real token) accumulate until ``reset_stats()``, counted on the device with ``scatter_add_`` (no host
sync). They are a plain tensor attribute, *not* a buffer: DistributedDataParallel broadcasts buffers from
rank 0 before every forward (``broadcast_buffers=True``), which would overwrite each rank's counts; so the
counts are per rank by design, and a global share is the all-reduce of the ranks' counts.
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


def switch_balance_loss(probs: torch.Tensor, idx: torch.Tensor, num_experts: int,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """``N * sum_i f_i P_i`` over the real rows: probs (T, N), idx (T, k), rows (T,) bool or None -> scalar.

    f_i counts token-slots per real token (sums to k), as transformers' Mixtral ``load_balancing_loss_func``
    for one layer; no host sync (counts by ``scatter_add_``).
    """
    T, k = idx.shape
    w = probs.new_ones(T) if rows is None else rows.to(probs.dtype)             # (T,) 1 = real token
    real = w.sum().clamp_min(1.0)                                               # R (0 real tokens -> loss 0)
    slots = probs.new_zeros(num_experts).scatter_add_(0, idx.reshape(-1), w[:, None].expand(T, k).reshape(-1))  # (N,)
    mean_prob = (probs.sum(0) if rows is None else w @ probs) / real           # (N,) P_i
    return num_experts * (slots / real * mean_prob).sum()


class Router(nn.Module):
    """``W_g`` (N, n) router returning :class:`RouterOutput` for x (T, n)."""

    def __init__(self, in_features: int, num_experts: int, top_k: int | None, *, renormalize: bool = False,
                 balance_coef: float = 0.0, balance_reduction: str = "mean",
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.balance_coef, self.balance_reduction = renormalize, balance_coef, balance_reduction
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self._counts = torch.zeros(num_experts, dtype=torch.long, device=device)   # not a buffer, see module doc
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, rows: torch.Tensor | None = None, *, count: bool = True,
                logits: torch.Tensor | None = None) -> RouterOutput:
        """Route x (T, n); ``rows`` (T,) bool marks real tokens (None: all); ``count=False`` skips the counts;
        ``logits`` (T, N): ``W_g x`` already computed by the caller (the fused input side of a layer)."""
        if logits is None:
            logits = F.linear(x, self.weight.to(x.dtype))                   # (T, N)
        probs = logits.to(torch.promote_types(x.dtype, torch.float32)).softmax(-1)  # (T, N)
        if self.top_k is None:
            if count:
                self._count(probs.argmax(-1, keepdim=True), rows)
            gates = probs.to(x.dtype)
            if rows is not None:
                gates = gates * rows[:, None].to(gates.dtype)               # padded rows: no head
            return RouterOutput(gates, None, probs, None)
        top, idx = probs.topk(self.top_k, dim=-1)                           # (T, k), (T, k)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        aux = self.balance_coef * switch_balance_loss(probs, idx, self.num_experts, rows)
        if count:
            self._count(idx, rows)
        return RouterOutput(top.to(x.dtype), idx, probs, aux)

    @property
    def expert_counts(self) -> torch.Tensor:
        """(N,) int64 token-slots per expert since the last reset (real tokens only), on the router's device."""
        return self._counts

    @torch.no_grad()
    def _count(self, idx: torch.Tensor, rows: torch.Tensor | None) -> None:
        flat = idx.reshape(-1)                                              # (T*k,)
        ones = torch.ones_like(flat) if rows is None else rows[:, None].to(flat.dtype).expand(idx.shape).reshape(-1)
        self._counts.scatter_add_(0, flat, ones)

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / ``to_empty()`` move the counts with the weight (they are not a buffer)."""
        result = super()._apply(fn, recurse)
        device = self.weight.device
        if self._counts.device != device:
            meta = self._counts.device.type == "meta"
            self._counts = torch.zeros_like(self._counts, device=device) if meta else self._counts.to(device)
        return result

    def routing_fraction(self) -> torch.Tensor:
        """Fraction (N,) of routed token-slots per expert since the last reset (zeros before any token)."""
        counts = self._counts.double().cpu() if self._counts.device.type != "meta" else torch.zeros(self.num_experts,
                                                                                                 dtype=torch.float64)
        total = counts.sum()
        return counts / total if total > 0 else counts

    def reset_stats(self) -> None:
        # a tensor made under inference_mode is an inference tensor, which the next training forward's
        # in-place count update would refuse: make it a normal one whatever the caller's mode
        with torch.inference_mode(False):
            self._counts = torch.zeros_like(self._counts)

    def extra_repr(self) -> str:
        k = "dense" if self.top_k is None else f"top_k={self.top_k}, renormalize={self.renormalize}"
        return f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}, {k}"
