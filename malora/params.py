"""Exact parameter accounting: counts on a real model and the analytic formulas of METHODS.md §1.5.

Per adapted linear ``W`` (in ``n``, out ``m``) with ``N`` experts (per-layer for MoSLD) the trainable
parameters are

============================  ===========================================
LoRA (rank r)                 ``r (n + m)``
MoLoRA (N experts, rank r)    ``N r (n + m) + N n``         (router W_g: N x n)
HydraLoRA / MoSLD (shared A)  ``r n + N r m + N n``
MALoRA (S_A, P_t, B_t)        ``d n + N r_bar d + N r_bar m + N n``
============================  ===========================================

Routers have no bias. The papers report the trainable share relative to the *base* model (LLaMA-2-7B,
6,738,415,616 parameters), i.e. ``trainable / (total - trainable)`` once everything but the adapters is frozen:
that is :attr:`ParamCount.share_of_base`. :func:`meta_llama` builds LLaMA-2-7B on the ``meta`` device (no
memory, no download) so the real counts can be checked against the formulas in well under a second.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from malora.config import AdapterConfig, ConfigError

# (n_in, m_out) or (layer_idx, n_in, m_out); layer_idx may be None for modules outside numbered layers.
LinearDims = tuple[int, int] | tuple[int | None, int, int]

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000)
"""LLaMA-2-7B dimensions (6,738,415,616 parameters with an untied LM head)."""


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model; every tensor counted once, even when it is reachable under several names."""

    trainable: int
    """Elements of parameters with ``requires_grad``."""
    total: int
    """Elements of all parameters (base + adapters)."""

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def share(self) -> float:
        """trainable / total."""
        return self.trainable / self.total if self.total else 0.0

    @property
    def share_of_base(self) -> float:
        """trainable / frozen: the papers' "#Params %" (adapters relative to the frozen backbone)."""
        return self.trainable / self.frozen if self.frozen else float("inf")


def count_parameters(model: nn.Module) -> ParamCount:
    """Count ``model``'s parameters, each shared tensor once (by identity and, off ``meta``, by storage).

    Tied weights (e.g. an LM head tied to the embedding) are one ``Parameter`` reachable under two names;
    ``named_parameters`` already yields it once. Distinct ``Parameter`` objects viewing the same storage are
    also counted once.
    """
    seen_ids: set[int] = set()
    seen_storage: set[tuple[int, int, tuple[int, ...]]] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen_ids:
            continue
        seen_ids.add(id(param))
        if param.device.type != "meta":
            key = (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape))
            if key in seen_storage:
                continue
            seen_storage.add(key)
        numel = param.numel()
        total += numel
        if param.requires_grad:
            trainable += numel
    return ParamCount(trainable=trainable, total=total)


def per_linear_trainable(cfg: AdapterConfig, n: int, m: int, num_experts: int | None = None) -> int:
    """Trainable parameters of one adapted linear (in ``n``, out ``m``) per METHODS.md §1.5.

    ``num_experts`` overrides ``cfg.num_experts`` (needed for per-layer MoSLD lists).
    """
    if cfg.kind == "lora":
        return cfg.r * (n + m)
    experts = cfg.num_experts if num_experts is None else num_experts
    if not isinstance(experts, int):
        raise ConfigError(f"{type(cfg).__name__}.num_experts={experts!r} is per-layer. "
                          "Fix: give dims as (layer_idx, n, m) tuples so each layer's expert count is known.")
    router = experts * n
    if cfg.kind == "molora":
        return experts * cfg.r * (n + m) + router
    if cfg.kind in ("mosld", "hydra"):
        return cfg.r * n + experts * cfg.r * m + router
    if cfg.kind == "malora":
        return cfg.d * n + experts * cfg.r_bar * cfg.d + experts * cfg.r_bar * m + router
    raise ConfigError(f"unknown adapter kind {cfg.kind!r}. Fix: use one of lora, molora, malora, mosld, hydra.")


def analytic_trainable(cfg: AdapterConfig, dims: Sequence[LinearDims], *, num_layers: int | None = None) -> int:
    """Sum of :func:`per_linear_trainable` over the adapted linears described by ``dims``.

    ``dims`` holds ``(n_in, m_out)`` per adapted linear, or ``(layer_idx, n_in, m_out)`` when the number of
    experts depends on the layer (MoSLD lists). ``num_layers`` defaults to the length of a per-layer list and
    is used to validate it (``cfg.experts_for_layer``).
    """
    per_layer = isinstance(getattr(cfg, "num_experts", None), tuple)
    if per_layer and num_layers is None:
        num_layers = len(cfg.num_experts)
    total = 0
    for entry in dims:
        if len(entry) == 3:
            layer_idx, n, m = entry
        elif len(entry) == 2:
            (n, m), layer_idx = entry, None
        else:
            raise ValueError(f"dims entry {entry!r} must be (n_in, m_out) or (layer_idx, n_in, m_out)")
        experts = cfg.experts_for_layer(layer_idx, num_layers) if hasattr(cfg, "num_experts") else None
        total += per_linear_trainable(cfg, n, m, experts)
    return total


_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Index of the numbered block a module lives in (``model.layers.3.mlp.up_proj`` -> 3), else None."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def linear_dims(model: nn.Module, target_modules: Sequence[str]) -> list[tuple[int | None, int, int]]:
    """``(layer_idx, n_in, m_out)`` of every ``nn.Linear`` / GPT-2 ``Conv1D`` whose last name component is a target.

    Read from an un-adapted model (works on ``meta``); adapter layers are not descended into.
    """
    targets = set(target_modules)
    dims = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, nn.Linear):
            dims.append((layer_index(name), module.in_features, module.out_features))
        elif type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (n_in, m_out)
            n, m = module.weight.shape
            dims.append((layer_index(name), int(n), int(m)))
    return dims


def meta_llama(**overrides: int) -> nn.Module:
    """A ``LlamaForCausalLM`` with LLaMA-2-7B dimensions (or ``overrides``) on the ``meta`` device.

    No memory is allocated and nothing is downloaded; parameter shapes (hence counts) are exact.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA2_7B, **overrides})
    with torch.device("meta"):
        return LlamaForCausalLM(config)
