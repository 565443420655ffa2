"""Inject adapters into a Hugging Face (or any torch) model, and read what they left after a forward.

Matching is by the last component of a module's path (``model.layers.7.self_attn.q_proj`` -> ``q_proj``;
GPT-2's ``h.3.attn.c_attn`` -> ``c_attn``) against ``cfg.target_modules``, over ``nn.Linear`` and transformers
``Conv1D`` modules (subclasses included, e.g. quantised linears). Everything except adapter tensors
(``lora_*``) is frozen.

The decoder-layer index of a module is the first integer component of its path; the layer count comes from the
model config (``num_hidden_layers`` or ``n_layer``), used for per-layer expert counts (MoSLD).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from malora.config import AdapterConfig, ConfigError
from malora.layers import AdapterLayer, build_adapter_layer
from malora.layers.base import Conv1D
from malora.deferred_aux import deferred_aux
from malora.routing import RoutingContext, mask_position_of

log = logging.getLogger(__name__)

_LINEAR_TYPES = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def _layer_index(name: str) -> int | None:
    """First integer path component: ``model.layers.7.self_attn.q_proj`` -> 7; None when there is none."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def _num_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLayer]]:
    """(module path, layer) for every adapter layer in ``model``, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, AdapterLayer)]


def adapter_context(model: nn.Module) -> RoutingContext | None:
    """The :class:`RoutingContext` ``inject_adapters`` attached to ``model``'s adapters (None if there is none).

    Found through the adapter layers, so it also works on a wrapper (DDP) or a deep copy of the model.
    """
    return next((layer.routing_context for _, layer in adapter_layers(model) if layer.routing_context), None)


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Replace every matching linear of ``model`` by an adapter layer, freeze the rest; return the paths replaced.

    Atomic: every adapter layer is built before the first swap, so a config that fails on any module raises
    with ``model`` untouched (modules, requires_grad flags, hooks) and a corrected config can be injected next.
    Raises ConfigError when nothing matches (listing the candidate names), when the model already holds
    adapters, or when a per-layer expert list does not fit the model's layer count.

    Also attaches a :class:`malora.routing.RoutingContext` holding ``cfg`` and installs its forward hooks on
    ``model``, so that a plain ``model(input_ids, attention_mask=mask)`` excludes padding from routing (see
    :mod:`malora.routing`). :func:`remove_adapters` undoes all of it.
    """
    if adapter_layers(model):
        raise ConfigError("model already has adapters injected. Fix: inject into a fresh base model "
                          "(or call malora.remove_adapters first).")
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ConfigError(
            f"{type(model).__name__} is an encoder-decoder model: its decoder's routed layers would read the "
            "encoder's attention_mask (the only mask the model's forward receives), so their padding rows would be "
            "wrong. Fix: adapt a decoder-only causal LM (or inject into the encoder module alone).")
    targets = set(cfg.target_modules)
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, _LINEAR_TYPES)]
    matches = [(name, mod) for name, mod in linears if name.rsplit(".", 1)[-1] in targets]
    if not matches:
        candidates = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise ConfigError(f"{type(cfg).__name__}.target_modules={cfg.target_modules!r} matched no linear module "
                          f"of {type(model).__name__}. Fix: choose from the candidates {candidates}.")
    per_layer = isinstance(getattr(cfg, "num_experts", None), tuple)
    num_layers = _num_layers(model) if per_layer else None
    if per_layer and num_layers is None:
        raise ConfigError(f"{type(cfg).__name__}.num_experts is per-layer but {type(model).__name__} has no "
                          "config.num_hidden_layers / n_layer. Fix: give a single integer.")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:  # building a layer freezes its base: undo that if any later module fails
        built = []
        for name, base in matches:
            experts = cfg.experts_for_layer(_layer_index(name), num_layers) if hasattr(cfg, "num_experts") else None
            built.append((name, build_adapter_layer(base, cfg, experts).train(base.training)))
    except BaseException:
        _restore_flags(model, flags)
        raise
    ctx = RoutingContext(config=cfg, mask_position=mask_position_of(model), requires_grad=flags)
    ctx.routed = [layer for _, layer in built if layer.ROUTED]
    for name, layer in built:
        layer.routing_context = ctx
        model.set_submodule(name, layer)  # keeps the model's train/eval mode (set above)
    ctx.install(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in built:
        for p in layer.adapter_params().values():
            p.requires_grad_(True)
    names = [name for name, _ in matches]
    log.info("injected %s adapters into %d modules", cfg.kind, len(names))
    return names


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])


def remove_adapters(model: nn.Module) -> list[str]:
    """Undo :func:`inject_adapters`: put every wrapped base back, remove the hooks, restore requires_grad.

    Returns the paths that held adapters (empty if there were none).
    """
    layers = adapter_layers(model)
    ctx = adapter_context(model)
    for name, layer in layers:
        model.set_submodule(name, layer.base)
    if ctx is not None:
        ctx.uninstall(model)
        _restore_flags(model, ctx.requires_grad)
    return [name for name, _ in layers]


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """The model's balance loss from its latest forward: ``reduce_l coef * N * sum_i f_i P_i`` (0-dim). A forward
    under ``no_grad`` while a grad-enabled one still awaits its backward leaves that one's loss, with its gradient
    (:mod:`malora.routing`).

    ``reduce`` over the routed modules l that ran in that forward is the config's ``balance_reduction``:

    - ``"mean"`` (default): ``(1/L) sum_l``. MixLoRA / MoE-PEFT (and transformers' Mixtral) compute *one*
      load-balancing loss from the router logits of all layers pooled together, so their coefficient weighs a
      quantity that is k under uniform routing whatever the depth; the mean keeps that scale, so the papers'
      0.01 (MALoRA Tables 8/9, taken from that lineage) means the same here as there, for any model depth.
    - ``"sum"``: ``sum_l``; the coefficient then weighs each module, so the total weight grows with depth
      (LLaMA-2-7B with MALoRA's 6 targets has L = 192 routed modules: "sum" at 0.01 equals "mean" at 1.92).

    Each layer's term equals ``coef * load_balancing_loss_func((logits_l,), N, k, attention_mask)`` of
    transformers' Mixtral on that layer's router logits. With reentrant gradient checkpointing a layer's term
    has no graph after the forward; it is returned through :func:`malora.deferred_aux.deferred_aux`, which
    routes its gradient to the recomputation (see :mod:`malora.deferred_aux`). A 0-dim zero when no layer has
    a loss.
    """
    terms, reductions = [], set()
    for _, layer in adapter_layers(model):
        if layer.last_aux_loss is None:                 # not run in the latest forward (RoutingContext.routed)
            continue
        reductions.add(layer.lora_router.balance_reduction)
        terms.append(deferred_aux(layer.last_aux_loss, layer.aux_box) if layer.aux_deferred else layer.last_aux_loss)
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    if len(reductions) > 1:
        raise ConfigError(f"the routed layers mix balance_reduction values {sorted(reductions)}. Fix: inject one "
                          "config per model.")
    total = sum(terms[1:], terms[0])
    return total / len(terms) if reductions == {"mean"} else total


def routing_stats(model: nn.Module, *, counts: bool = False) -> dict[str, torch.Tensor]:
    """Per routed layer path: fraction (N,) float64 of token-slots each expert received since the last reset.

    Only real tokens are counted (padding excluded, see :mod:`malora.routing`): the slots of a layer sum to
    (real tokens seen) x k. ``counts=True`` returns those raw int64 counts instead (CPU), which is what to
    all-reduce for a global share under DDP: every rank counts its own tokens only (the counts are not module
    buffers, so DDP's buffer broadcast leaves them alone).
    """
    return {name: layer.lora_router.expert_counts.cpu().clone() if counts else layer.lora_router.routing_fraction()
            for name, layer in adapter_layers(model) if hasattr(layer, "lora_router")}


def reset_routing_stats(model: nn.Module) -> None:
    """Zero every router's token counts."""
    for _, layer in adapter_layers(model):
        if hasattr(layer, "lora_router"):
            layer.lora_router.reset_stats()
