"""The edges that trainers and accelerate exercise: recomputation masks, hooked bases, encoder-decoder models,
DataParallel, inference-mode resets, additive / 4-D masks, keyword-only constructors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from malora import (ConfigError, LoRAConfig, MALoRAConfig, MoLoRAConfig, adapter_layers, collect_aux_loss,
                    inject_adapters, reset_routing_stats, routing_stats)
from malora.layers import MALoRALinear, MoLoRALinear, MoSLDLinear, Router, build_adapter_layer
from malora.routing import MaskShapeError
from tests.malora.test_inject import LLAMA_TARGETS, padded, tiny_llama_double_with
from tests.malora.test_layers import CONFIGS as LAYER_CONFIGS
from tests.malora.test_layers import N_IN, N_OUT, PAD_MASK, Holder, expected_counts, reference
from tests.tiny import tiny_llama

CKPT_CFG = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, dropout=0.0, balance_coef=0.5, dispatch="dense",
                        target_modules=LLAMA_TARGETS)


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------- a. recomputation mask
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_recomputation_uses_the_mask_of_the_forward_it_recomputes(reentrant):
    ids, mask, pos = padded()
    other = torch.ones_like(mask)                                      # a different mask for the no_grad forward
    plain = tiny_llama_double_with(CKPT_CFG)
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    out = plain(ids, attention_mask=mask, position_ids=pos, labels=ids)
    (out.loss + collect_aux_loss(plain)).backward()                    # the single-forward reference
    out = checkpointed(ids, attention_mask=mask, position_ids=pos, labels=ids)
    loss = out.loss + collect_aux_loss(checkpointed)
    with torch.no_grad():                                              # e.g. an evaluation or generate in between
        checkpointed(ids, attention_mask=other, position_ids=pos)
    loss.backward()
    ref, got = grads_of(plain), grads_of(checkpointed)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_backward_through_two_forwards_with_different_masks_is_refused_under_checkpointing():
    ids, mask, pos = padded()
    model = tiny_llama_double_with(CKPT_CFG)
    model.activation_checkpointing_enable({"use_reentrant": False})
    first = model(ids, attention_mask=mask, position_ids=pos, labels=ids).loss
    second = model(ids, attention_mask=torch.ones_like(mask), position_ids=pos, labels=ids).loss
    with pytest.raises(RuntimeError, match=r"two model forwards with different attention masks.*Fix"):
        (first + second).backward()


def test_a_no_grad_forward_before_collect_aux_loss_keeps_the_training_forwards_balance_loss():
    """A no_grad forward (an evaluation, TRL's reference forward) between a training forward and its backward leaves
    the balance loss of the training forward, with its gradient; once that backward ran, a no_grad forward's
    own loss is what collect_aux_loss returns."""
    ids, mask, pos = padded()
    other = torch.ones_like(mask)
    reference = tiny_llama_double_with(CKPT_CFG)
    model = copy.deepcopy(reference)
    out = reference(ids, attention_mask=mask, position_ids=pos, labels=ids)
    expected = collect_aux_loss(reference)
    (out.loss + expected).backward()                                   # no forward in between: the reference
    out = model(ids, attention_mask=mask, position_ids=pos, labels=ids)
    with torch.no_grad():
        model(ids, attention_mask=other, position_ids=pos)
    aux = collect_aux_loss(model)
    assert aux.requires_grad
    torch.testing.assert_close(aux, expected, rtol=1e-12, atol=0)
    (out.loss + aux).backward()
    ref, got = grads_of(reference), grads_of(model)
    assert any("lora_router" in name for name in ref)                  # the balance loss's own gradient is compared
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
    with torch.no_grad():                                              # nothing awaits a backward now
        reference(ids, attention_mask=other, position_ids=pos)
        model(ids, attention_mask=other, position_ids=pos)
    evaluation = collect_aux_loss(reference)
    assert not torch.allclose(evaluation, expected)                    # another mask: another loss
    torch.testing.assert_close(collect_aux_loss(model), evaluation, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------ b. hooked bases
def test_a_hooked_or_overridden_base_takes_the_unfused_path_and_its_hook_sees_its_own_output():
    torch.manual_seed(0)
    layer = build_adapter_layer(nn.Linear(N_IN, N_OUT, dtype=torch.float64), LoRAConfig(r=3, dropout=0.0))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, N_IN, dtype=torch.float64, requires_grad=True)
    W, b = layer.base.weight, layer.base.bias
    delta = layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)      # (T, m), by hand

    handle = layer.base.register_forward_pre_hook(lambda mod, args: (2 * args[0],))
    torch.testing.assert_close(layer(x), F.linear(2 * x, W, b) + delta)  # the pre-hook changed the base's input
    assert not layer.fused_input_applies(x)
    handle.remove()
    assert layer.fused_input_applies(x)

    captured = []
    handle = layer.base.register_forward_hook(lambda mod, args, out: captured.append(out))
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = layer(x)
        torch.testing.assert_close(captured[-1], F.linear(x, W, b))  # not mutated by the adapter's add
        torch.testing.assert_close(y, F.linear(x, W, b) + delta)
    assert len(captured) == 2
    handle.remove()

    class Doubling(ModelHook):                                         # accelerate replaces the instance's forward
        def pre_forward(self, module, *args, **kwargs):
            return (2 * args[0],), kwargs

    add_hook_to_module(layer.base, Doubling())
    torch.testing.assert_close(layer(x), F.linear(2 * x, W, b) + delta)
    assert not layer.fused_input_applies(x)


# ------------------------------------------------------------------------------ c. encoder-decoder
def test_encoder_decoder_models_are_refused_at_injection():
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"T5ForConditionalGeneration is an encoder-decoder.*Fix"):
        inject_adapters(model, MALoRAConfig(d=8, r_bar=4, num_experts=2, top_k=1, target_modules=("q", "v")))
    assert not adapter_layers(model) and before == {n: p.requires_grad for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------- d. DataParallel
def test_data_parallel_replicas_are_refused_with_a_pointer_to_ddp():
    model = tiny_llama().eval()
    inject_adapters(model, MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS))
    ids, mask, _ = padded()
    # what nn.DataParallel's replicate() makes of each module before calling the copy on its GPU
    replica = model._replicate_for_data_parallel()
    with pytest.raises(RuntimeError, match=r"DataParallel.*torchrun.*DistributedDataParallel"):
        replica(ids, attention_mask=mask)
    name, layer = adapter_layers(model)[0]
    with pytest.raises(RuntimeError, match=r"DataParallel"):
        layer._replicate_for_data_parallel()(torch.randn(2, layer.in_features))
    model(ids, attention_mask=mask)                                    # the model itself still runs


# ----------------------------------------------------------------------- e. inference mode and masks
def test_reset_under_inference_mode_leaves_training_working():
    model = tiny_llama().eval()
    inject_adapters(model, MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS))
    ids, mask, pos = padded()
    with torch.inference_mode():
        model(ids, attention_mask=mask, position_ids=pos)
        reset_routing_stats(model)
    model.train()
    out = model(ids, attention_mask=mask, position_ids=pos, labels=ids)
    (out.loss + collect_aux_loss(model)).backward()
    assert all(c.sum() == int(mask.sum()) * 2 for c in routing_stats(model, counts=True).values())


@pytest.mark.parametrize("kind", ["molora", "malora", "hydra"])
def test_additive_and_float_masks_mean_what_they_say(kind):
    holder = Holder(LAYER_CONFIGS[kind])
    layer = holder.proj
    x = torch.randn(3, 7, N_IN, dtype=torch.float64)
    rows = PAD_MASK.reshape(-1).bool()
    additive = torch.zeros(PAD_MASK.shape).masked_fill(PAD_MASK == 0, float("-inf"))
    for mask in (additive, additive.clamp_min(torch.finfo(torch.float32).min), PAD_MASK.float()):
        layer.lora_router.reset_stats()
        y = holder(x, attention_mask=mask)
        torch.testing.assert_close(y, reference(layer, x, rows=rows), rtol=1e-10, atol=1e-10)
        assert layer.lora_router.expert_counts.tolist() == expected_counts(layer, x, rows)
    layer.lora_router.reset_stats()
    holder(x, attention_mask=torch.zeros(PAD_MASK.shape))              # additive, nothing masked: every row
    assert layer.lora_router.expert_counts.sum() == 21 * getattr(layer, "top_k", 1)
    with pytest.raises(MaskShapeError, match=r"float attention_mask.*Fix"):
        holder(x, attention_mask=PAD_MASK.float() * 0.5 + 0.25)


def attention_mask_4d(padding: torch.Tensor, *, additive: bool) -> torch.Tensor:
    """(B, 1, L, L) causal mask that also hides padding keys, as transformers builds it (True / 0 = attend)."""
    L = padding.shape[1]
    allowed = torch.ones(L, L, dtype=torch.bool).tril()[None, None] & padding.bool()[:, None, None, :]
    if not additive:
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_a_4d_attention_mask_routes_real_tokens_only(additive):
    holder = Holder(LAYER_CONFIGS["malora"])
    layer = holder.proj
    x = torch.randn(3, 7, N_IN, dtype=torch.float64)
    rows = PAD_MASK.reshape(-1).bool()                                 # right- and left-padded rows
    y = holder(x, attention_mask=attention_mask_4d(PAD_MASK, additive=additive))
    torch.testing.assert_close(y, reference(layer, x, rows=rows), rtol=1e-10, atol=1e-10)
    assert layer.lora_router.expert_counts.tolist() == expected_counts(layer, x, rows)


def test_static_cache_generate_counts_what_dynamic_cache_generate_counts():
    """generate with a static cache passes 4-D masks (K = the cache length > Q); the counts equal those of the
    same generate with the default cache, which passes the 2-D padding mask."""
    counts = []
    for cache in (None, "static"):
        model = tiny_llama().eval()
        model.generation_config.pad_token_id = 0
        inject_adapters(model, MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS))
        ids, mask, _ = padded(lengths=(6, 3), width=6, left=True)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       **({"cache_implementation": cache} if cache else {}))
        counts.append({k: v.tolist() for k, v in routing_stats(model, counts=True).items()})
    assert counts[1] == counts[0]
    assert all(sum(c) == (9 + 2 * 2) * 2 for c in counts[0].values())   # real prompt tokens + 2 steps x 2 rows


# ------------------------------------------------------------------------------ f. keyword-only floats
def test_layer_constructors_take_their_floats_by_keyword_only():
    base = nn.Linear(N_IN, N_OUT)
    with pytest.raises(TypeError):
        MoSLDLinear(base, 3, 5, 2, 16.0, 0.1, 0.2)                     # alpha, dropconnect, dropout by position
    with pytest.raises(TypeError):
        MoLoRALinear(base, 3, 5, 2, 16.0, 0.1)
    with pytest.raises(TypeError):
        MALoRALinear(base, 6, 4, 2, 1, 8.0)
    with pytest.raises(TypeError):
        Router(N_IN, 4, 2, True, 0.01)
    layer = MoSLDLinear(base, r=3, num_experts=5, top_k=2, alpha=16.0, dropconnect=0.1, dropout=0.2)
    assert (layer.dropconnect, layer.dropout.p, layer.scaling) == (0.1, 0.2, 16.0 / 3)
    assert isinstance(build_adapter_layer(nn.Linear(N_IN, N_OUT), MoLoRAConfig(r=2, num_experts=2, top_k=1)),
                      MoLoRALinear)
