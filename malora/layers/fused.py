"""The input side of an adapted linear in one autograd node: frozen matmul, router logits and down-projection.

An adapter layer reads its input x (T, n) three times: the frozen ``y = W x + b`` (W (m, n)), the router's
``logits = W_g x`` (W_g (N, n), routed layers only) and the down-projection of the dropped input
``z = D dropout(x)`` (D (q, n): LoRA's A, MALoRA's S_A, MoSLD's and HydraLoRA's shared A). Left to autograd, each
use returns its own (T, n) x-gradient in a new buffer and autograd sums them out of place; the dropout's backward
makes one more (T, n) pass, and its output ``dropout(x)`` (T, n) stays saved for D's gradient. On a CPU those
fresh (T, n) buffers are most of an adapter's cost beyond its FLOPs: a K = 8 or 32 GEMM into a new 5 MB buffer
inside a training step ran 5-10x slower than into a reused one (``benchmarks/README.md``).

Here, with ``s = 1 / (1 - p)`` and the dropped flat positions ``P`` of :func:`malora.layers.dropout.drop_positions`
(``x_d`` = x with zeros at P; ``s`` is folded into the small D):

    forward   y = x W^T + b,   logits = x W_g^T,   z = x_d (s D)^T
    backward  dx = (dz (s D)) with zeros at P,  then  dx += dlogits W_g  and  dx += dy W   (in place, ``addmm_``)
              dW_g = dlogits^T x,   dD = s dz^T x_d   (x_d rebuilt from x and P)

so one (T, n) buffer holds the whole x-gradient and the frozen GEMM accumulates into it (BLAS beta = 1); the
saved tensors are x and P only. The math is the unfused composition's; the results differ by float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from malora.layers.dropout import zero_positions_


def _dropped(x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """x (T, n) with zeros at the flat ``positions`` (a new tensor), or x itself without dropout."""
    if positions is None:
        return x
    return zero_positions_(x.clone(memory_format=torch.contiguous_format), positions)


class FrozenRouterDown(torch.autograd.Function):
    """``(x W^T + b, x W_g^T, x_d (s D)^T)`` for x (T, n) contiguous; W frozen. See the module docstring.

    ``weight`` (m, n) and ``bias`` (m,) or None belong to the frozen linear; ``router`` (N, n) or None;
    ``down`` (q, n) is already scaled by s; ``positions`` int64 flat drop positions or None (no dropout).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, router: torch.Tensor | None,
                down: torch.Tensor, positions: torch.Tensor | None):
        y = F.linear(x, weight, bias)                                           # (T, m)
        logits = F.linear(x, router) if router is not None else None           # (T, N)
        z = F.linear(_dropped(x, positions), down)                              # (T, q)
        ctx.save_for_backward(x, weight, router, down, positions)
        ctx.set_materialize_grads(False)
        return y, logits, z

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, dlogits: torch.Tensor | None, dz: torch.Tensor | None):
        x, weight, router, down, positions = ctx.saved_tensors
        need_x, _, _, need_router, need_down, _ = ctx.needs_input_grad
        dx = drouter = ddown = None
        if need_x:
            if dz is not None:
                dx = dz.mm(down)                                                # (T, n), the only new buffer
                if positions is not None:
                    zero_positions_(dx, positions)
            for g, w in ((dlogits, router), (dy, weight)):
                if g is not None and w is not None:
                    dx = g.mm(w) if dx is None else dx.addmm_(g, w)
        if need_router and dlogits is not None:
            drouter = dlogits.T.mm(x)                                           # (N, n)
        if need_down and dz is not None:
            ddown = dz.T.mm(_dropped(x, positions))                             # (q, n), of the scaled D
        return dx, None, None, drouter, ddown, None
