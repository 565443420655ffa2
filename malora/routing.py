"""Which token rows a routed layer may count: the model's padding mask, handed to its routed layers.

``inject_adapters`` attaches one :class:`RoutingContext` to the model it adapts (a plain object, not a module:
no parameters, no buffers, nothing in the state dict) and registers two hooks on that model:

- a forward **pre-hook** that reads the forward's ``attention_mask`` (keyword, or the positional slot the
  model's ``forward`` signature gives it) and keeps it as a (B, L) bool tensor, True = real token
  (:func:`real_token_mask` says how each kind of mask reads);
- a forward **post-hook** (``always_call``, so it also runs when the forward raises) that marks the forward done,
  forgets its mask and, after a forward entered with grad enabled, puts a grad hook on its outputs (see
  *Recomputation* below).

A plain ``model(input_ids, attention_mask=mask)`` (or ``DistributedDataParallel(model)(**batch)``, which calls
the model) is therefore enough. Every routed layer of that model asks :meth:`RoutingContext.rows` which rows of
its input (T = B*S rows) are real (:func:`rows_of`):

- input (B, S, n) with S <= L: the last S columns of the mask (S < L while decoding with a KV cache, where the
  mask covers past + new tokens); input (B*L, n): the flattened mask; anything else raises MaskShapeError;
- no mask: every row is real.

A layer called outside its model's forward (e.g. a sub-module called directly) sees no mask and counts all rows,
also when compiled: the mask is dropped when the model's forward returns, so it never outlives its forward.

**The balance loss of a training forward survives a no_grad forward.** After a forward entered with grad enabled
and before a backward has reached its outputs (the loss is still to be trained on), a forward under ``no_grad`` /
``inference_mode`` (an evaluation, a ``generate``, TRL's reference forward on the same model) leaves every routed
layer's ``last_aux_loss`` as the training forward set it, so ``collect_aux_loss`` still returns the loss with a
gradient. Otherwise (nothing awaits a backward) a no_grad forward's own balance loss is what it returns.

**Recomputation** (gradient checkpointing re-runs a block's forward during backward; detected as a forward
running inside the autograd engine, :func:`in_backward`) does not count tokens again and needs the mask of the
forward it recomputes, which is not the latest one when a ``no_grad`` forward (an evaluation, a ``generate``)
ran in between. So every forward entered with grad enabled keeps its mask under its *generation* number
(``saved_masks``), and a grad hook on that forward's outputs records, when backward reaches them, which
generation the running backward belongs to; the recomputation reads that generation's mask. One backward
through two forwards with different masks (``(loss_1 + loss_2).backward()`` under checkpointing) cannot tell
them apart and raises. How the balance loss itself survives reentrant checkpointing is
:mod:`malora.deferred_aux`, a separate concern.

**Under torch.compile** the hooks run eagerly (``torch.compiler.disable``) and a traced layer only slices its
rows from ``mask`` inside the graph (:func:`row_state`); no per-forward Python state is read there, which Dynamo
would turn into guards and recompile on. A traced layer cannot tell a checkpoint recomputation from a forward, so
from the moment the model is compiled (``compiled``: set by :func:`malora.compile.compile_blocks`, by the first
forward when a compiled module holds routed layers, or by a traced routed layer) a forward with gradient
checkpointing on raises.

Models are refused where routing would be wrong: ``nn.DataParallel`` replicas (they would share this context and
the layers' per-forward fields; use DDP) raise at forward time.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SAVED_MASKS = 8
"""Masks of grad-enabled forwards kept for recomputations (the newest; each is a (B, L) bool tensor)."""


class MaskShapeError(ValueError):
    """The forward's attention_mask does not describe the rows of a routed layer's input."""


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass (a checkpointed forward being recomputed)."""
    return graph_task() != -1


def graph_task() -> int:
    """Id of the backward pass running on this thread, -1 outside backward."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return -1 if task_id is None else task_id()


def checkpointing_on(model: nn.Module) -> bool:
    """True when a module of ``model`` has transformers' gradient checkpointing on (its ``gradient_checkpointing``
    flag, which ``gradient_checkpointing_enable`` sets on the blocks)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def holds_compiled(model: nn.Module, layers: list[nn.Module]) -> bool:
    """True when a module of ``model`` compiled with ``module.compile()`` holds one of ``layers``."""
    wanted = {id(layer) for layer in layers}
    return any(getattr(m, "_compiled_call_impl", None) is not None and any(id(x) in wanted for x in m.modules())
               for m in model.modules())


def refuse_replica(module: nn.Module) -> None:
    """Raise on an ``nn.DataParallel`` replica (``replicate`` marks each copy ``_is_replica``)."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "malora adapters cannot run under torch.nn.DataParallel: its replicas share the routing context and "
            "each layer's per-forward fields (balance loss, counts). Fix: launch with torchrun for "
            "DistributedDataParallel (transformers' Trainer then uses DDP), or use one GPU (CUDA_VISIBLE_DEVICES=0).")


def mask_position_of(model: nn.Module) -> int | None:
    """Index of ``attention_mask`` among the positional parameters of ``model.forward`` (None if it has none)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("attention_mask") if "attention_mask" in positional else None


def real_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True = real token, from an attention mask of any of the usual kinds.

    2-D padding masks (B, L):

    - bool or integer (1 = real, 0 = padding): ``mask != 0``;
    - float multiplicative (values in {0, 1}, at least one 1): ``mask != 0``;
    - float additive (0 = real, a large negative value or -inf = padding, as added to attention scores; an
      all-zero float mask is additive: nothing is padded): ``mask == 0``.

    A float mask with other values (positive non-ones, or negatives mixed with ones) raises MaskShapeError.

    3-D (B, Q, K) or 4-D (B, H, Q, K) attention masks (bool True or additive 0 = may attend; a static-cache
    ``generate`` passes these) give (B, Q), from what a real token always may do: attend to itself.

    - Q == K (no cache: query q is key q): q is real when it may attend to key q (the diagonal), which a
      padding position may not, whatever the padding side;
    - Q < K (a cache: the queries' key positions are not given): q is real when it may attend to some key. A
      left-padded (generate's) padding query's row is fully masked, so this is exact there.
    """
    if mask.dim() >= 3:
        if mask.is_floating_point():
            allowed = mask > torch.finfo(mask.dtype).min / 2                # -inf and finfo.min: masked
        else:
            allowed = mask != 0
        allowed = allowed.reshape(allowed.shape[0], -1, *allowed.shape[-2:])   # (B, H, Q, K), H = 1 for 3-D
        if allowed.shape[-2] == allowed.shape[-1]:
            return allowed.diagonal(dim1=-2, dim2=-1).any(1)               # (B, Q) may attend to itself
        return allowed.any(-1).any(1)                                       # (B, Q) may attend to something
    if not mask.is_floating_point():
        return mask.bool()
    zero, one = mask == 0, mask == 1
    if bool((zero | one).all()) and bool(one.any()):
        return one                                                      # multiplicative
    if bool((mask <= 0).all()):
        return zero                                                     # additive
    raise MaskShapeError(
        f"float attention_mask with values other than 0/1 (multiplicative) or 0/negative (additive), e.g. "
        f"{mask[~(zero | one)].flatten()[:3].tolist()}. Fix: pass a bool or integer padding mask (1 = real token).")


def rows_of(mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(T,) bool real-row mask for a routed-layer input of ``shape`` (..., n) from the (B, L) bool ``mask``."""
    B, L = mask.shape
    key = tuple(shape[:-1])
    if len(key) == 2 and key[0] == B and key[1] <= L:
        return mask[:, L - key[1]:].reshape(-1)                         # (B*S,) the newest S positions
    if len(key) == 1 and key[0] == B * L:
        return mask.reshape(-1)                                         # (B*L,)
    raise MaskShapeError(
        f"attention_mask of shape {tuple(mask.shape)} does not describe the rows of a routed layer input of "
        f"shape {tuple(shape)}: expected (B={B}, S<={L}, n) or (B*L={B * L}, n). Fix: pass the padding mask of "
        "this forward's tokens, or no attention_mask.")


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(torch.equal(a, b))


def _output_tensors(output: Any) -> list[torch.Tensor]:
    """The top-level tensors of a model output (a tensor, a ModelOutput / dict, or a tuple) that require grad."""
    if isinstance(output, torch.Tensor):
        items = [output]
    elif isinstance(output, Mapping):
        items = list(output.values())
    elif isinstance(output, (tuple, list)):
        items = list(output)
    else:
        items = []
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


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
    """Number of model forwards so far: the key of ``saved_masks`` and of the deferred balance losses."""
    saved_masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    """generation -> mask of the newest SAVED_MASKS forwards entered with grad enabled (for recomputations)."""
    backward: tuple[int, int] | None = None
    """(graph task id, generation) of the latest backward that reached a forward's outputs."""
    ambiguous_task: int | None = None
    """A backward that reached two forwards with different masks: recomputing in it raises."""
    routed: list[nn.Module] = field(default_factory=list, repr=False)
    """The routed adapter layers of the model; each model forward clears their ``last_aux_loss`` first, so that
    after it a layer holds a balance loss only if it ran in it."""
    compiled: bool = False
    """Routed layers of this model run under ``torch.compile``: a forward with gradient checkpointing on raises."""
    awaiting_backward: int | None = None
    """Generation of the latest grad-enabled forward whose outputs no backward has reached yet (None: none)."""
    _kept: list[tuple[nn.Module, Any, bool, Any]] | None = None
    """(layer, last_aux_loss, aux_deferred, aux_box) of each routed layer, kept across a no_grad forward."""
    _rows: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------ hooks
    # The hooks always run eagerly, also when the whole model is compiled (``torch.compile(model)``, transformers'
    # ``torch_compile=True``): traced, their forward counter would be a guard and recompile every step.
    @torch.compiler.disable
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        refuse_replica(module)
        self.depth += 1
        if self.depth > 1:  # the model calling itself: keep the outer forward's mask
            return
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_position is not None and len(args) > self.mask_position:
            mask = args[self.mask_position]
        if not self.compiled and self.generation == 0:    # once: compiled before the adapters were injected
            self.compiled = holds_compiled(module, self.routed)
        if self.compiled and checkpointing_on(module):
            raise RuntimeError(
                "malora: routed adapter layers compiled with torch.compile cannot be recomputed by gradient "
                "checkpointing (a recomputation would count its tokens again and replace the balance loss). Fix: "
                "model.gradient_checkpointing_disable(), or do not compile the decoder layers.")
        self.mask = self._read_mask(mask)
        self._rows = {}
        self.grad_at_entry = torch.is_grad_enabled()
        if not self.grad_at_entry and self.awaiting_backward is not None:   # restored by the post-hook
            self._kept = [(layer, layer.last_aux_loss, layer.aux_deferred, layer.aux_box) for layer in self.routed]
        for layer in self.routed:
            layer.last_aux_loss = None
        self.generation += 1
        if self.grad_at_entry:
            self.saved_masks[self.generation] = self.mask
            while len(self.saved_masks) > SAVED_MASKS:
                del self.saved_masks[next(iter(self.saved_masks))]     # oldest first (insertion order)

    @torch.compiler.disable
    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth > 0:
            return
        self.mask, self._rows = None, {}                # a layer called after this forward must not read its mask
        if self._kept is not None:                      # a no_grad forward: the training forward's losses stand
            for layer, loss, deferred, box in self._kept:
                layer.last_aux_loss, layer.aux_deferred, layer.aux_box = loss, deferred, box
            self._kept = None
        if self.grad_at_entry and not in_backward():
            tensors = _output_tensors(output)
            if tensors:
                generation = self.awaiting_backward = self.generation
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads: self._reached(generation), mode="any")

    def _reached(self, generation: int) -> None:
        """A backward reached the outputs of forward ``generation``: its recomputations use that mask."""
        if self.awaiting_backward is not None and generation >= self.awaiting_backward:
            self.awaiting_backward = None
        task = graph_task()
        if self.backward is not None and self.backward[0] == task and self.backward[1] != generation:
            if not _same_mask(self.saved_masks.get(generation), self.saved_masks.get(self.backward[1])):
                self.ambiguous_task = task
        self.backward = (task, generation)

    def _read_mask(self, mask: Any) -> torch.Tensor | None:
        if not isinstance(mask, torch.Tensor) or mask.dim() < 2:
            return None
        return real_token_mask(mask)

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
        """(T,) bool real-row mask of the current forward for a layer input of ``shape``; None = all real."""
        if self.mask is None:
            return None
        key = tuple(shape[:-1])
        if key not in self._rows:
            self._rows[key] = rows_of(self.mask, shape)
        return self._rows[key]

    # ------------------------------------------------------------------------------------ recomputation
    def recomputed_generation(self) -> int | None:
        """Generation of the forward that the checkpoint recomputation now running belongs to (None: unknown)."""
        task = graph_task()
        if self.ambiguous_task == task:
            raise RuntimeError(
                "malora: one backward call went through two model forwards with different attention masks under "
                "gradient checkpointing, so a recomputed layer cannot tell which mask is its own. Fix: call "
                "backward after each forward (gradient accumulation does), or give the forwards the same mask.")
        if self.backward is not None and self.backward[0] == task:
            if self.backward[1] not in self.saved_masks:
                raise RuntimeError(
                    f"malora: a checkpoint recomputation belongs to a forward more than {SAVED_MASKS} grad-enabled "
                    "forwards old, whose attention mask is no longer kept. Fix: call backward after each forward.")
            return self.backward[1]
        return max(self.saved_masks) if self.saved_masks else None     # no grad hook ran: the newest one


@dataclass
class RowState:
    """What one routed-layer call should do (see :func:`row_state`)."""

    rows: torch.Tensor | None
    """(T,) bool, True = real token; None = all rows real."""
    recompute: bool
    """A checkpoint recomputation: do not count, keep last_aux_loss."""
    defer_aux: bool
    """The balance loss computed now has no graph but a later recomputation will (reentrant checkpointing)."""
    generation: int = -1
    """The model forward this call belongs to (for a recomputation: the one it recomputes); -1 = none."""


NO_CONTEXT = RowState(rows=None, recompute=False, defer_aux=False)


def row_state(ctx: RoutingContext | None, shape: torch.Size) -> RowState:
    """How a routed layer with context ``ctx`` treats an input of ``shape``."""
    if ctx is None:
        return NO_CONTEXT
    if torch.compiler.is_compiling():
        # Traced by torch.compile: no host-side bookkeeping (the graph-task id is not traceable and an int read
        # here would be a guard, recompiling at every forward). Checkpoint recomputation is refused instead (the
        # pre-hook, once ``compiled`` is set); the rows are sliced from the mask inside the graph.
        ctx.compiled = True
        return RowState(rows=None if ctx.mask is None else rows_of(ctx.mask, shape), recompute=False,
                        defer_aux=False)
    if in_backward():
        generation = ctx.recomputed_generation()
        mask = None if generation is None else ctx.saved_masks[generation]
        return RowState(rows=None if mask is None else rows_of(mask, shape), recompute=True, defer_aux=False,
                        generation=-1 if generation is None else generation)
    if ctx.depth == 0:                                                  # called outside the model's forward
        return NO_CONTEXT
    defer = ctx.grad_at_entry and not torch.is_grad_enabled()
    return RowState(rows=ctx.rows(shape), recompute=False, defer_aux=defer, generation=ctx.generation)
