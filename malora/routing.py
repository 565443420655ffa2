"""Which token rows a routed layer may count, and how its balance loss survives gradient checkpointing.

``inject_adapters`` attaches one :class:`RoutingContext` to the model it adapts (a plain object, not a module:
no parameters, no buffers, nothing in the state dict) and registers two hooks on that model:

- a forward **pre-hook** that reads the forward's ``attention_mask`` (keyword, or the positional slot the
  model's ``forward`` signature gives it) and keeps it as a (B, L) bool tensor, True = real token;
- a forward **post-hook** (``always_call``, so it also runs when the forward raises) that marks the forward done.

A plain ``model(input_ids, attention_mask=mask)`` (or ``DistributedDataParallel(model)(**batch)``, which calls
the model) is therefore enough. Every routed layer of that model asks :meth:`RoutingContext.rows` which rows
of its input (T = B*S rows) are real:

- input (B, S, n) with S <= L: the last S columns of the mask (S < L while decoding with a KV cache, where the
  mask covers past + new tokens); input (B*L, n): the flattened mask; anything else raises MaskShapeError;
- a mask that is not 2-D (a 4-D custom attention bias is not a padding mask) or no mask: every row is real.

A layer called outside its model's forward (e.g. a sub-module called directly) sees no mask and counts all rows.

Gradient checkpointing re-runs a layer's forward during backward. Such a **recomputation** (detected as a
forward running inside the autograd engine, ``torch._C._current_graph_task_id() != -1``) uses the mask of the
most recent model forward (so every backward must follow its own forward, as in any training loop, gradient
accumulation included), does not count tokens again and does not replace ``last_aux_loss``. With
``use_reentrant=False`` the balance loss of the first forward keeps its graph and nothing else is needed. With
``use_reentrant=True`` the first forward runs under ``no_grad``, so its balance loss has no graph; the loss is
then *deferred*: ``collect_aux_loss`` returns it through :class:`_DeferredAux`, whose backward stores
dTotal/dAux in the layer's :class:`AuxGradBox`, and the recomputation ties its (differentiable) balance loss
to the layer output with :class:`_AttachAux`, whose backward feeds that stored gradient into the router. This
needs the LM loss and the balance loss in one backward call, as ``(lm_loss + collect_aux_loss(model)).backward()``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class MaskShapeError(ValueError):
    """The forward's attention_mask does not describe the rows of a routed layer's input."""


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpointed forward being recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def mask_position_of(model: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``model.forward`` (None if it has none)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("attention_mask") if "attention_mask" in positional else None


@dataclass
class AuxGradBox:
    """dTotal/dAux of one layer's deferred balance loss (reentrant checkpointing), filled during backward."""

    grad: torch.Tensor | None = None
    pending: int = 0
    """collect_aux_loss results made with grad enabled whose backward has not run yet."""


@dataclass
class RoutingContext:
    """Per-model routing state installed by ``inject_adapters``; see the module docstring."""

    config: Any
    """The adapter config the model was injected with (what save/export compare against)."""
    mask_position: int | None = None
    requires_grad: dict[str, bool] = field(default_factory=dict)
    """Every parameter's requires_grad before injection, restored by ``remove_adapters``."""
    mask: torch.Tensor | None = None
    """(B, L) bool, True = real token, of the latest model forward (None: no usable mask)."""
    depth: int = 0
    """> 0 while the model's forward runs."""
    grad_at_entry: bool = False
    """Grad mode when the model's forward started (a layer then running under no_grad is being checkpointed)."""
    generation: int = 0
    """Number of model forwards so far; a layer's balance loss counts only if it is from the latest one."""
    _rows: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ hooks
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.depth += 1
        if self.depth > 1:  # the model calling itself: keep the outer forward's mask
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_position is not None and len(args) > self.mask_position:
            mask = args[self.mask_position]
        self.mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._rows = {}
        self.grad_at_entry = torch.is_grad_enabled()
        self.generation += 1

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.depth = max(0, self.depth - 1)

    def install(self, model: nn.Module) -> None:
        model.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        model.register_forward_hook(self.post_hook, with_kwargs=True, always_call=True)

    def uninstall(self, model: nn.Module) -> None:
        """Remove this context's hooks from ``model`` (found by owner, so this also works on a deep copy)."""
        ids = [key for hooks in (model._forward_pre_hooks, model._forward_hooks)
               for key, hook in hooks.items() if getattr(hook, "__self__", None) is self]
        for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            table = getattr(model, name, {})
            for key in ids:
                table.pop(key, None)

    # ------------------------------------------------------------------------------------------- rows
    def rows(self, shape: torch.Size) -> torch.Tensor | None:
        """(T,) bool real-row mask for a layer input of ``shape`` (..., n), or None when every row is real."""
        mask = self.mask
        if mask is None:
            return None
        key = tuple(shape[:-1])
        cached = self._rows.get(key)
        if cached is not None:
            return cached
        B, L = mask.shape
        if len(key) == 2 and key[0] == B and key[1] <= L:
            rows = mask[:, L - key[1]:].reshape(-1)                     # (B*S,) the newest S positions
        elif len(key) == 1 and key[0] == B * L:
            rows = mask.reshape(-1)                                     # (B*L,)
        else:
            raise MaskShapeError(
                f"attention_mask of shape {tuple(mask.shape)} does not describe the rows of a routed layer "
                f"input of shape {tuple(shape)}: expected (B={B}, S<={L}, n) or (B*L={B * L}, n). Fix: pass "
                "the padding mask of this forward's tokens, or no attention_mask.")
        self._rows[key] = rows
        return rows


@dataclass
class RowState:
    """What one routed-layer call should do (see :func:`row_state`)."""

    rows: torch.Tensor | None
    """(T,) bool, True = real token; None = all rows real."""
    recompute: bool
    """A checkpoint recomputation: do not count, keep last_aux_loss."""
    defer_aux: bool
    """The balance loss computed now has no graph but a later recomputation will (reentrant checkpointing)."""


NO_CONTEXT = RowState(rows=None, recompute=False, defer_aux=False)


def row_state(ctx: RoutingContext | None, shape: torch.Size) -> RowState:
    """How a routed layer with context ``ctx`` treats an input of ``shape``."""
    if ctx is None:
        return NO_CONTEXT
    recompute = in_backward()
    if ctx.depth == 0 and not recompute:                                # called outside the model's forward
        return NO_CONTEXT
    defer = not recompute and ctx.grad_at_entry and not torch.is_grad_enabled()
    return RowState(rows=ctx.rows(shape), recompute=recompute, defer_aux=defer)


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
    if aux is None or not aux.requires_grad:
        return y
    return _AttachAux.apply(y, aux, box)
