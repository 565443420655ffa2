"""Inject adapters into a Hugging Face (or any torch) model, and read what they left after a forward.

Matching is by the last component of a module's path (``model.layers.7.self_attn.q_proj`` -> ``q_proj``;
GPT-2's ``h.3.attn.c_attn`` -> ``c_attn``) against ``cfg.target_modules``, over ``nn.Linear`` and transformers
``Conv1D`` modules. Everything except adapter tensors (``lora_*``) is frozen.

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


def inject_adapters(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Replace every matching linear of ``model`` by an adapter layer, freeze the rest; return the paths replaced.

    Raises ConfigError when nothing matches (listing the candidate names), when the model already holds
    adapters, or when a per-layer expert list does not fit the model's layer count.
    """
    if adapter_layers(model):
        raise ConfigError("model already has adapters injected. Fix: inject into a fresh base model.")
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
    for name, base in matches:
        experts = cfg.experts_for_layer(_layer_index(name), num_layers) if hasattr(cfg, "num_experts") else None
        layer = build_adapter_layer(base, cfg, experts)
        model.set_submodule(name, layer.train(base.training))  # keep the model's train/eval mode
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.adapter_params().values():
            p.requires_grad_(True)
    names = [name for name, _ in matches]
    log.info("injected %s adapters into %d modules", cfg.kind, len(names))
    return names


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the layers' ``last_aux_loss`` (already multiplied by balance_coef); 0-dim zero when there is none."""
    losses = [layer.last_aux_loss for _, layer in adapter_layers(model) if layer.last_aux_loss is not None]
    if losses:
        return sum(losses[1:], losses[0])
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros((), device=device)


def routing_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per routed layer path: fraction (N,) of token-slots each expert received since the last reset."""
    return {name: layer.lora_router.routing_fraction() for name, layer in adapter_layers(model)
            if hasattr(layer, "lora_router")}


def reset_routing_stats(model: nn.Module) -> None:
    """Zero every router's token counts."""
    for _, layer in adapter_layers(model):
        if hasattr(layer, "lora_router"):
            layer.lora_router.reset_stats()
