"""``torch.compile`` for an adapted model, one decoder block at a time.

    from malora.compile import compile_blocks
    inject_adapters(model, MALoRAConfig())
    compile_blocks(model)                        # every decoder block, adapters inside, through Inductor
    loss = model(**batch).loss + collect_aux_loss(model)
    with torch.compiler.set_stance("force_eager"):   # e.g. scoring: no second compilation under no_grad
        model(**eval_batch)

Why blocks, not the model: the blocks are identical modules, so Dynamo traces one and every other block reuses its
graph (parameters are graph inputs); the embedding, the loss and the model's own Python (masks, caches, the
routing context's hooks) stay eager. Why it pays on CPU: a bf16 step's GEMMs run on the matrix units, and what
is left is memory-bound elementwise work (norms, SiLU x up, casts, the adapters' dropout and routing), which
Inductor fuses into a few loops per block (benchmarks/README.md, "Compiled decoder blocks": 1.17-1.35x eager
on a bf16 Xeon).

Every adapter traces whole: the input dropout draws its positions through one opaque op
(:mod:`malora.layers.dropout`), the fused input node steps aside, and a routed layer reads its padding rows from
the routing context inside the graph (:func:`malora.routing.row_state`). What compilation cannot do is gradient
checkpointing around routed layers (a recomputation inside a compiled graph cannot tell it is one), so it is
refused here and at every forward after. The sparse dispatch and the grouped dispatch's bmm form read the
experts' loads on the host (a graph break per routed layer); the dense dispatch (what ``choose_dispatch`` picks
for the papers' shapes) and ``torch._grouped_mm`` do not.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from malora.config import ConfigError
from malora.inject import adapter_context
from malora.routing import checkpointing_on


RECOMPILE_LIMIT = 64
"""Dynamo cache entries that the blocks :func:`compile_blocks` compiles allow (Dynamo's default is 8)."""


def _within(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def language_model(model: nn.Module) -> nn.Module:
    """The module that holds the language model's decoder blocks: ``get_decoder()`` of the outermost transformers
    model inside ``model`` (LlamaForCausalLM: its LlamaModel; a LLaVA-style VLM: its ``language_model``, never the
    vision tower), found through wrappers (DDP, a loss module); ``model`` itself when nothing has ``get_decoder``."""
    for module in model.modules():
        get_decoder = getattr(module, "get_decoder", None)
        if not callable(get_decoder):
            continue
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError, ValueError):    # the few models without a rule for it
            return module
        return decoder if isinstance(decoder, nn.Module) else module
    return model


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the repeated decoder blocks of a transformers model: inside :func:`language_model`, the
    outermost modules whose class a ``_no_split_modules`` names (Llama's ``LlamaDecoderLayer``, GPT-2's
    ``GPT2Block``). A listed class nested in a block is compiled with it, not a second time; the blocks of a
    vision tower (``CLIPEncoderLayer`` in a LLaVA) are not the language model's and are left eager."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    root = language_model(model)
    prefix = next((path for path, module in model.named_modules() if module is root), "")
    blocks: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():                 # parents before children: the outermost come first
        if (type(module).__name__ in names and _within(path, prefix)
                and not any(_within(path, outer) for outer, _ in blocks)):
            blocks.append((path, module))
    return blocks


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``block.compile(**compile_kwargs)`` (default ``dynamic=True``: batch shapes vary) on every decoder block of
    ``model`` (:func:`decoder_blocks`); returns their paths. Raises ConfigError when the model has no blocks to find
    or has gradient checkpointing on; from here on its routing context refuses a forward with checkpointing on
    (:mod:`malora.routing`), also one enabled before the first compiled step.

    The blocks' Dynamo cache holds up to ``recompile_limit`` (default :data:`RECOMPILE_LIMIT`) entries, passed to
    ``torch.compile`` for these blocks only; Dynamo's process-wide ``recompile_limit`` is left as it is (only on an
    older torch, whose ``torch.compile`` takes no ``recompile_limit``, is that global raised to it instead)."""
    if checkpointing_on(model):
        raise ConfigError(
            "compile_blocks: the model has gradient checkpointing on, which compiled routed adapters cannot be "
            "recomputed under. Fix: model.gradient_checkpointing_disable() before compiling, or do not compile.")
    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(
            f"compile_blocks: found no decoder blocks in {type(model).__name__} (no module whose class its "
            "_no_split_modules names). Fix: compile the model's repeated layers yourself with module.compile().")
    compile_kwargs.setdefault("dynamic", True)
    # Every block of every compiled model shares one code object (the module's call), and each adapter kind and
    # block input kind (the first block's input needs no grad) is one cache entry of it: a process holding models
    # of several kinds (a calibration, a benchmark) would pass Dynamo's default limit of 8 and run the rest eagerly.
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        compile_kwargs.setdefault("recompile_limit", RECOMPILE_LIMIT)
    else:                                                      # an older torch: only the process-wide limit exists
        limit = compile_kwargs.pop("recompile_limit", RECOMPILE_LIMIT)
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"   # torch < 2.7
        setattr(config, name, max(getattr(config, name), limit))
    for _, block in blocks:
        block.compile(**compile_kwargs)
    ctx = adapter_context(model)
    if ctx is not None and ctx.routed:      # refuse checkpointing from the next forward on, before a layer has run
        ctx.compiled = True
    return [path for path, _ in blocks]
