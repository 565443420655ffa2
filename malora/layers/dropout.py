"""Input dropout of the adapters, with a mask drawn several times cheaper on CPU than ``nn.Dropout``'s.

``dropout(x) = x * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` per element, as ``nn.Dropout``. On CPU,
stock dropout fills a float tensor with ``bernoulli_`` (one Mersenne-Twister draw per element), divides it by
1 - p in place and multiplies: at SmolLM2's 800 x 576 layer inputs that is ~5 ms of ~21 ms for the frozen
layer's forward + backward, paid by every adapted linear (``benchmarks/adapter_speed.py`` profile, README).

Here one 64-bit draw over the full int64 range (``random_(-2**63, 2**63 - 1)``) gives four independent uniform
16-bit integers u; an element is kept when ``u >= t - 2**15`` with ``t = round(p * 2**16)``, i.e. with
probability ``1 - p'`` where ``p' = t / 2**16`` is p rounded to a multiple of 2^-16 (0.05 -> 0.0500031); kept
elements are scaled by ``1 / (1 - p')``, so ``E[dropout(x)] = x`` exactly. The mask is written straight as the
scaled float multiplier (0 or ``1/(1-p')``), which autograd keeps for backward exactly as stock dropout keeps
its float mask. The draws come from the default generator of x's device, so ``torch.manual_seed`` reproduces
them. Off CPU the fused ``F.dropout`` kernel is already one pass and is used as is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 1 << 16   # resolution of the drop probability: 16-bit draws


def keep_multiplier(shape: torch.Size | tuple[int, ...], p: float, *, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """A tensor of ``shape`` holding ``1 / (1 - p')`` where kept (probability ``1 - p'``) and 0 where dropped.

    ``p' = round(p * 2**16) / 2**16``. Four 16-bit uniforms per 64-bit draw (see the module doc)."""
    drop = round(p * LEVELS)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1)                      # full range: all 64 bits uniform
    u = words.view(torch.int16)[:numel].view(shape)                 # uniform on [-2^15, 2^15)
    # P(keep) = 1 - drop / 2^16; the comparison writes 0./1. straight into the float result: 5x cheaper on CPU
    # than a bool mask converted afterwards (or torch.where), which allocate and pass over (T, n) twice more
    keep = torch.empty(shape, dtype=dtype, device=device)
    torch.ge(u, drop - LEVELS // 2, out=keep)
    return keep.mul_(LEVELS / (LEVELS - drop))


class InputDropout(nn.Module):
    """``nn.Dropout(p)`` for the adapters' input x (T, n); on CPU the mask is drawn by :func:`keep_multiplier`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p

    def drop_probability(self, device_type: str = "cpu") -> float:
        """The probability an element is dropped: p rounded to a multiple of 2^-16 on CPU, p elsewhere."""
        return round(self.p * LEVELS) / LEVELS if device_type == "cpu" else self.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * keep_multiplier(x.shape, self.p, dtype=x.dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"
