"""The tests' tiny LLaMA: one config-built ``LlamaForCausalLM`` with random weights, seeded, so every call with the
same arguments builds the same model (the weights are drawn from ``torch.manual_seed(seed)``)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(*, hidden_size: int = 64, intermediate_size: int = 128, num_hidden_layers: int = 2,
               vocab_size: int = 128, seed: int = 0, **config) -> LlamaForCausalLM:
    """A ``num_hidden_layers``-block LLaMA, 4 query heads over 2 key/value heads (grouped-query attention, as
    LLaMA-2-70B / LLaMA-3), in training mode as built; ``config`` adds LlamaConfig keys (``pad_token_id``,
    ``tie_word_embeddings``, ...)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                        num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=vocab_size, **config))


def small_llama(**overrides) -> LlamaForCausalLM:
    """:func:`tiny_llama` at width 32 (MLP 48, vocabulary 50): the size of the checkpoint, parameter-count, PEFT and
    DDP tests; ``overrides`` as tiny_llama's arguments."""
    return tiny_llama(**{"hidden_size": 32, "intermediate_size": 48, "vocab_size": 50, **overrides})
