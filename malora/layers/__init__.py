"""Adapter layers, one module per method, and ``build_adapter_layer`` (config -> layer around a frozen linear)."""

from __future__ import annotations

from torch import nn

from malora.config import (AdapterConfig, ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig,
                           MoSLDConfig)
from malora.layers.base import AdapterLayer, choose_dispatch
from malora.layers.hydra import HydraLoRALinear
from malora.layers.lora import LoRALinear
from malora.layers.malora import MALoRALinear, malora_init
from malora.layers.molora import MoLoRALinear
from malora.layers.mosld import MoSLDLinear
from malora.layers.router import Router, RouterOutput, switch_balance_loss

__all__ = [
    "AdapterLayer", "HydraLoRALinear", "LoRALinear", "MALoRALinear", "MoLoRALinear", "MoSLDLinear", "Router",
    "RouterOutput", "build_adapter_layer", "choose_dispatch", "malora_init", "switch_balance_loss",
]


def build_adapter_layer(base: nn.Module, cfg: AdapterConfig, num_experts: int | None = None) -> AdapterLayer:
    """Wrap the frozen ``base`` linear in the adapter ``cfg`` describes.

    ``num_experts`` overrides the config's count (injection passes the per-layer MoSLD value); it is required
    when the config holds a per-layer list.
    """
    if num_experts is None and hasattr(cfg, "num_experts"):
        if not isinstance(cfg.num_experts, int):
            raise ConfigError(f"{type(cfg).__name__}.num_experts={cfg.num_experts!r} is per-layer. Fix: pass "
                              "num_experts for this layer (inject_adapters does this).")
        num_experts = cfg.num_experts
    if getattr(cfg, "top_k", 0) > (num_experts or 0):
        raise ConfigError(f"{type(cfg).__name__}.top_k={cfg.top_k} exceeds num_experts={num_experts} for this "
                          "layer. Fix: lower top_k or add experts.")
    if isinstance(cfg, LoRAConfig):
        return LoRALinear(base, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout)
    routed = dict(num_experts=num_experts, dropout=cfg.dropout)
    if isinstance(cfg, HydraLoRAConfig):
        return HydraLoRALinear(base, r=cfg.r, alpha=cfg.alpha, **routed)
    routed.update(top_k=cfg.top_k, alpha=cfg.alpha, renormalize=cfg.renormalize, balance_coef=cfg.balance_coef,
                  balance_reduction=cfg.balance_reduction, dispatch=cfg.dispatch)
    if isinstance(cfg, MoLoRAConfig):
        return MoLoRALinear(base, r=cfg.r, **routed)
    if isinstance(cfg, MALoRAConfig):
        return MALoRALinear(base, d=cfg.d, r_bar=cfg.r_bar, beta=cfg.beta, k0_is_expert=cfg.k0_is_expert, **routed)
    if isinstance(cfg, MoSLDConfig):
        return MoSLDLinear(base, r=cfg.r, dropconnect=cfg.dropconnect, **routed)
    raise ConfigError(f"unknown adapter config type {type(cfg).__name__}. Fix: use a config from malora.config.")
