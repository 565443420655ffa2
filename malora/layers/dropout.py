"""Input dropout of the adapters that draws only the dropped positions and keeps no mask tensor.

``dropout(x) = x * keep / (1 - p)`` with ``keep ~ Bernoulli(1 - p)`` i.i.d. per element, as ``nn.Dropout``.

On CPU, stock dropout (and any mask-based variant) draws one random number per element, fills a (T, n) float
mask, multiplies, and keeps the mask for backward: at SmolLM2's 800 x 576 layer inputs that was ~1.4 ms of a
~40 ms frozen up-projection step, paid by each of a model's 180 adapted linears, plus 4 bytes of saved mask per
input element. With p = 0.05 only one element in twenty is dropped, so here only those are drawn:

- the gaps between consecutive dropped elements of the flattened input are i.i.d. Geometric(p) on {1, 2, ...}
  (a Bernoulli process), drawn by inversion ``gap = 1 + floor(log(v) / log(1 - p))`` of ``v`` uniform on (0, 1];
  their running sum gives the dropped flat positions. About ``p * numel`` draws instead of ``numel``.
- forward: ``y = x * (1 / (1 - p))``, then zeros written at those positions (``index_fill_``);
- backward: the same on the incoming gradient. Only the positions are saved (8 bytes per *dropped* element:
  0.4 bytes per input element at p = 0.05, against 4 for a float mask).

The uniforms are float32 from the default generator of x's device (``torch.manual_seed`` reproduces them);
their 2^-24 resolution perturbs the gap probabilities by at most ~2^-24 each, far below any sampling noise. The
drop probability is p itself (no rounding). Off CPU the fused ``F.dropout`` kernel is already one pass and is used
as is.

Under ``torch.compile`` the loop above would split the compiled graph at every adapted linear (``int(pos[-1])``
reads a tensor on the host), and the alternative, ``F.dropout``, draws one random number per element inside the
compiled kernel (most of a compiled step's time on CPU). There the same positions come from :func:`drop_mask`, a
custom op that the compiler calls as one opaque kernel returning a 1-byte keep mask; the multiply by it fuses with
the neighbouring passes.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn


def drop_positions(numel: int, p: float, device: torch.device | str = "cpu", *,
                   margin_sd: float = 6.0) -> torch.Tensor:
    """Sorted int64 flat positions in ``[0, numel)``, each included independently with probability p.

    Draws gaps of a Bernoulli(p) process in blocks of ``mean + margin_sd * sd (+ 16)`` gaps, the mean and sd of
    the number of drops in what is left to cover: one block with overwhelming probability; a block that falls
    short is followed by another from where it ended (the process is memoryless, so nothing is biased).
    """
    if numel == 0 or p == 0.0:
        return torch.empty(0, dtype=torch.int64, device=device)
    inv_log_keep = 1.0 / math.log1p(-p)                             # < 0
    blocks, last = [], -1                                           # last: position of the previous drop
    while last < numel - 1:
        remaining = numel - 1 - last
        k = max(16, int(remaining * p + margin_sd * math.sqrt(remaining * p * (1 - p)) + 16))
        v = torch.rand(k, device=device).neg_().add_(1.0)          # uniform on (0, 1]
        gaps = v.log_().mul_(inv_log_keep).floor_().add_(1.0)      # Geometric(p) on {1, 2, ...}, float32
        pos = gaps.to(torch.int64).cumsum_(0).add_(last)            # (k,) increasing drop positions
        blocks.append(pos)
        last = int(pos[-1])
    pos = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
    return pos[: int(torch.searchsorted(pos, numel))]               # positions < numel (pos is sorted)


def _keep_mask(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """(numel,) bool keep mask, False at the positions :func:`drop_positions` draws (the same exact process)."""
    keep = torch.ones(numel, dtype=torch.bool, device=device)
    return keep.index_fill_(0, drop_positions(numel, p, device), False)


def _register_drop_mask():
    """:func:`_keep_mask` as the custom op ``malora::drop_mask``, so that ``torch.compile`` calls it as one opaque
    kernel: its host read stays inside, the graph does not break, the mask's use (one multiply) fuses with its
    neighbours, and the ``nondeterministic_seeded`` tag keeps the compiler from recomputing it (a second draw) for
    the backward. None on a torch whose ``custom_op`` takes no tags (< 2.5): compiled code then takes the
    positions path, correct but split at each adapter."""
    if "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return None
    op = torch.library.custom_op("malora::drop_mask", _keep_mask, mutates_args=(),
                                 tags=(torch.Tag.nondeterministic_seeded,))
    op.register_fake(lambda numel, p, device: torch.empty(numel, dtype=torch.bool, device=device))
    return op


drop_mask = _register_drop_mask()


def zero_positions_(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Write zeros at the flat ``positions`` of the contiguous t, in place; returns t."""
    t.view(-1).index_fill_(0, positions, 0.0)
    return t


class _DropPositions(torch.autograd.Function):
    """``y = x * scale`` with zeros at the flat ``positions``; the same map on the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return zero_positions_(x.mul(scale).contiguous(), positions)  # a new contiguous tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        return zero_positions_(grad.mul(ctx.scale).contiguous(), positions), None, None


class InputDropout(nn.Module):
    """``nn.Dropout(p)`` for the adapters' input x (T, n); on CPU only the dropped positions are drawn."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p

    def positions(self, x: torch.Tensor) -> torch.Tensor | None:
        """Freshly drawn flat positions to drop in x, or None when this call drops nothing (eval, p = 0)."""
        if not self.training or self.p == 0.0:
            return None
        return drop_positions(x.numel(), self.p, x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        if drop_mask is not None and torch.compiler.is_compiling():
            return x * drop_mask(x.numel(), self.p, x.device).view(x.shape) * (1.0 / (1.0 - self.p))
        return _DropPositions.apply(x, self.positions(x), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"
