"""The balance loss under *reentrant* gradient checkpointing: deferred to the recomputation that has a graph.

With ``use_reentrant=True`` a checkpointed block's first forward runs under ``no_grad``, so the balance loss a
routed layer computes there has no graph. The gradient must reach the router anyway, and it can only do so
through the block's recomputation during backward (which runs with grad enabled). Two autograd functions pass
it along, one :class:`AuxGradBox` per layer between them:

1. ``collect_aux_loss`` returns the graph-less loss through :func:`deferred_aux`; the backward of that node
   stores dTotal/dAux in the layer's box;
2. the recomputation ties its (differentiable) balance loss to the layer output with :func:`attach_aux`; the
   backward of that node sends the stored gradient into the recomputed loss, hence into the router.

This needs the LM loss and the balance loss in one backward call, as ``(lm_loss + collect_aux_loss(model))
.backward()`` (the order inside one backward is then right: the sum's node runs before any recomputation).
A balance loss back-propagated on its own raises at the next forward (see ``AdapterLayer.forward``).
With ``use_reentrant=False`` the first forward's loss keeps its graph and none of this is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AuxGradBox:
    """dTotal/dAux of one layer's deferred balance loss, filled during backward."""

    grad: torch.Tensor | None = None
    pending: int = 0
    """collect_aux_loss results made with grad enabled whose backward has not run yet."""


class _DeferredAux(torch.autograd.Function):
    """Identity on a (graph-less) balance-loss value; backward records dTotal/dAux in the layer's box."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, value: torch.Tensor, box: AuxGradBox) -> torch.Tensor:
        ctx.box = box
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        box = ctx.box
        box.grad = grad if box.grad is None else box.grad + grad
        box.pending = max(0, box.pending - 1)
        return None, None, None


def deferred_aux(value: torch.Tensor, box: AuxGradBox) -> torch.Tensor:
    """``value`` as a tensor that requires grad (when grad is enabled); its gradient lands in ``box``."""
    if not torch.is_grad_enabled():
        return value
    box.pending += 1
    anchor = torch.ones((), device=value.device, requires_grad=True)
    return _DeferredAux.apply(anchor, value, box)


class _AttachAux(torch.autograd.Function):
    """Identity on a layer output y; backward also sends the stored dTotal/dAux into the recomputed aux loss."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, box: AuxGradBox) -> torch.Tensor:
        ctx.box = box
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return y.clone()                                                # a fresh tensor: later in-place ops are safe

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        box = ctx.box
        if box.grad is None and box.pending:
            raise RuntimeError(
                "malora: with reentrant gradient checkpointing the balance loss reaches the routers through the "
                "recomputation, so it must be back-propagated in the same backward call as the LM loss. Fix: "
                "call (lm_loss + collect_aux_loss(model)).backward(), or use use_reentrant=False.")
        shape, dtype, device = ctx.aux_meta
        grad_aux = None if box.grad is None else box.grad.to(dtype=dtype, device=device).expand(shape)
        box.grad = None                                                 # used once per backward
        return grad_y, grad_aux, None


def attach_aux(y: torch.Tensor, aux: torch.Tensor | None, box: AuxGradBox) -> torch.Tensor:
    """y, with the recomputed ``aux`` receiving the gradient stored in ``box`` when y's gradient arrives."""
    if aux is None or not aux.requires_grad:
        return y
    return _AttachAux.apply(y, aux, box)
