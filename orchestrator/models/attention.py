"""SDPA attention for bf16 training on CPU: the products that need a backward run in float32.

torch 2.13's CPU flash-attention kernel is fast in bf16 forward but slow in bf16 backward. Measured on one
AMX Xeon thread, SmolLM2-135M's attention shape (B 8, 9 query / 3 KV heads, head dim 64, causal), process
CPU time per call:

    T    fp32 fwd   fp32 fwd+bwd   bf16 fwd   bf16 fwd+bwd   bf16 math fwd+bwd
    40   0.72 ms    2.34 ms        0.56 ms    11.5 ms        3.6 ms
    64   1.03       3.89           0.48       11.0           5.4
    128  3.19       12.3           1.34       24.5           16.9

so :func:`sdpa_cpu_mixed` runs attention in float32 when autograd will need its backward (q, k, v upcast, the
output cast back: (B, H, T, 64) tensors, cheap beside the layer's GEMMs) and in the inputs' own dtype otherwise
(scoring). Everything else is transformers' own ``sdpa_attention_forward``; the mask function is sdpa's.
``use_mixed_attention(model)`` switches a loaded model to it (registered once under :data:`NAME`).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

NAME = "sdpa_cpu_mixed"
LOW = (torch.bfloat16, torch.float16)


def sdpa_cpu_mixed(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention; on CPU with low-precision inputs that need gradients, computed in float32.

    query (B, H, T, d), key/value (B, H_kv, S, d), attention_mask None, bool or additive (B, 1, T, S);
    returns ((B, T, H, d) in the query's dtype, None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if query.device.type != "cpu" or dtype not in LOW or not backward:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype == dtype:   # an additive mask follows the inputs
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return out.to(dtype), weights


@functools.cache
def register() -> str:
    """Register :func:`sdpa_cpu_mixed` (and sdpa's mask builder) with transformers under :data:`NAME`, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_cpu_mixed)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_mixed_attention(model: nn.Module) -> bool:
    """Switch a model that uses SDPA attention to :func:`sdpa_cpu_mixed`; True if it did (others are left)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    model.set_attn_implementation(register())
    return True
