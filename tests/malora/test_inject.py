"""Injection into tiny config-built LLaMA and GPT-2 models, parametrised over every adapter kind."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.pytorch_utils import Conv1D

from malora.config import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig)
from malora.inject import (adapter_context, adapter_layers, collect_aux_loss, inject_adapters, remove_adapters,
                           reset_routing_stats, routing_stats)
from malora.layers import AdapterLayer, LoRALinear
from tests.tiny import tiny_llama

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "lora": LoRAConfig(r=4, target_modules=LLAMA_TARGETS),
    "molora": MoLoRAConfig(r=4, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS),
    "malora": MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS),
    "mosld": MoSLDConfig(r=4, num_experts=(2, 4), top_k=2),
    "hydra": HydraLoRAConfig(r=4, num_experts=3, target_modules=LLAMA_TARGETS),
}
ROUTED = ["molora", "malora", "mosld", "hydra"]


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identity_at_init_and_only_adapters_train(kind):
    model = tiny_llama().eval()
    with torch.no_grad():
        base_logits = model(IDS).logits
    frozen = {id(p): p.detach().clone() for p in model.parameters()}  # base params keep their identity
    cfg = CONFIGS[kind]
    replaced = inject_adapters(model, cfg)
    targets = set(cfg.target_modules)
    assert len(replaced) == 2 * len(targets) and {r.rsplit(".", 1)[-1] for r in replaced} == targets
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base_logits)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert trainable == {f"{name}.{k}" for name, layer in adapter_layers(model) for k in layer.adapter_params()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(IDS, labels=IDS).loss + collect_aux_loss(model)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, frozen.pop(id(p))), f"frozen parameter {n} changed"
    assert not frozen, "every base parameter is still in the model"
    for name, layer in adapter_layers(model):
        assert not torch.all(layer.lora_B == 0), f"{name}.lora_B did not train"
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(IDS).logits, base_logits)


def test_mosld_per_layer_experts():
    model = tiny_llama().eval()
    inject_adapters(model, CONFIGS["mosld"])
    experts = {name: layer.num_experts for name, layer in adapter_layers(model)}
    assert experts == {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 2,
                       "model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 4}
    with pytest.raises(ConfigError, match=r"has 3 per-layer entries but the model has 2 layers.*exactly 2"):
        inject_adapters(tiny_llama().eval(), MoSLDConfig(num_experts=(2, 4, 6)))


def router_inputs(model) -> dict[str, torch.Tensor]:
    """Filled on every forward with each routed layer's router input x (T, n), for independent references."""
    seen: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        if hasattr(layer, "lora_router"):
            layer.lora_router.register_forward_hook(
                lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach()))
    return seen


def padded(lengths=(9, 5, 2), width=9, pad_id=0, left=False):
    """IDS' first ``lengths[b]`` tokens of each row, padded to ``width`` with ``pad_id`` (right or left)."""
    ids = torch.full((len(lengths), width), pad_id)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    source = torch.cat([IDS, IDS.flip(0)])
    for b, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[b, cols], mask[b, cols] = source[b, :n], 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)                  # as the evaluation code passes them
    return ids, mask, position_ids


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ROUTED)
def test_aux_loss_and_routing_stats_match_transformers_reference(kind, reduction):
    cfg = CONFIGS[kind]
    if kind != "hydra":
        cfg = type(cfg)(**{**cfg.to_dict(), "balance_reduction": reduction, "balance_coef": 0.03})
    model = tiny_llama().eval()
    inject_adapters(model, cfg)
    seen = router_inputs(model)
    ids, mask, pos = padded()
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos)
    rows = mask.reshape(-1).bool()
    counts, refs = routing_stats(model, counts=True), []
    assert set(counts) == {name for name, _ in adapter_layers(model)}
    for name, layer in adapter_layers(model):
        router = layer.lora_router
        logits = seen[name] @ router.weight.T                          # (T, N) from the captured input
        k = router.top_k or 1
        chosen = logits.topk(k).indices if router.top_k else logits.argmax(-1, keepdim=True)
        expected = torch.bincount(chosen[rows].reshape(-1), minlength=layer.num_experts)
        assert counts[name].tolist() == expected.tolist(), name
        assert counts[name].sum() == int(mask.sum()) * k              # real tokens x k
        torch.testing.assert_close(routing_stats(model)[name], expected.double() / expected.sum())
        if router.top_k:
            refs.append(cfg.balance_coef * load_balancing_loss_func((logits,), layer.num_experts, k, mask))
    aux = collect_aux_loss(model)
    if kind == "hydra":
        assert aux.item() == 0.0 and not refs
    else:
        expected = torch.stack(refs).sum() / (len(refs) if reduction == "mean" else 1)
        torch.testing.assert_close(aux, expected, rtol=1e-5, atol=0)
    reset_routing_stats(model)
    assert all(torch.all(frac == 0) for frac in routing_stats(model).values())


@pytest.mark.parametrize("kind", ["molora", "malora", "mosld"])
def test_padding_width_pad_id_and_side_do_not_change_stats_or_loss(kind):
    model = tiny_llama().eval().double()
    inject_adapters(model, CONFIGS[kind])
    results = []
    for width, pad_id, left in [(9, 0, False), (14, 77, False), (12, 3, True)]:
        reset_routing_stats(model)
        ids, mask, pos = padded(width=width, pad_id=pad_id, left=left)
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=pos)
        results.append((routing_stats(model, counts=True), collect_aux_loss(model)))
    (counts, aux), others = results[0], results[1:]
    assert all(c.sum() == 16 * CONFIGS[kind].top_k for c in counts.values())   # 9 + 5 + 2 real tokens
    for other_counts, other_aux in others:
        assert {k: v.tolist() for k, v in other_counts.items()} == {k: v.tolist() for k, v in counts.items()}
        torch.testing.assert_close(other_aux, aux, rtol=1e-9, atol=0)


def test_attention_mask_is_picked_up_positionally_and_stale_masks_are_not_reused():
    model = tiny_llama().eval()
    inject_adapters(model, CONFIGS["malora"])
    ids, mask, _ = padded()
    with torch.no_grad():
        model(ids, mask)                                               # LlamaForCausalLM.forward(input_ids, attention_mask)
    assert all(c.sum() == 16 * 2 for c in routing_stats(model, counts=True).values())
    reset_routing_stats(model)
    with torch.no_grad():
        model(ids)                                                     # no mask this time: every position counts
    assert all(c.sum() == ids.numel() * 2 for c in routing_stats(model, counts=True).values())


def test_left_padded_generation_counts_prompt_and_new_tokens_once():
    model = tiny_llama().eval()
    model.generation_config.pad_token_id = 0
    inject_adapters(model, CONFIGS["malora"])
    ids, mask, _ = padded(lengths=(6, 3), width=6, left=True)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10)
    # step 1 routes the 9 real prompt tokens; steps 2-4 one new token per row (the mask then covers past + new)
    assert all(c.sum() == (9 + 2 * 3) * 2 for c in routing_stats(model, counts=True).values())


def tiny_llama_double_with(cfg):
    model = tiny_llama().eval().double()
    inject_adapters(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.normal_(0.0, 0.1)                             # the adapters change the LM loss too
    return model.train()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_keeps_balance_gradient_and_counts_once(reentrant, dropout):
    """With dropout the check stays exact: both models draw from the same seed in the same layer order, and
    checkpointing restores the RNG state before a recomputation (preserve_rng_state), so it redraws the same
    dropped positions."""
    cfg = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, dropout=dropout, balance_coef=0.5,
                       target_modules=LLAMA_TARGETS)
    ids, mask, pos = padded()

    def step(model):
        torch.manual_seed(7)
        out = model(ids, attention_mask=mask, position_ids=pos, labels=ids)
        aux = collect_aux_loss(model)
        (out.loss + aux).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return aux.detach(), grads, routing_stats(model, counts=True)

    plain = tiny_llama_double_with(cfg)
    checkpointed, no_aux = copy.deepcopy(plain), copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable({"use_reentrant": reentrant})
    aux, grads, counts = step(plain)
    aux_ckpt, grads_ckpt, counts_ckpt = step(checkpointed)
    torch.testing.assert_close(aux_ckpt, aux, rtol=1e-12, atol=0)
    assert {k: v.tolist() for k, v in counts_ckpt.items()} == {k: v.tolist() for k, v in counts.items()}
    assert all(c.sum() == 16 * 2 for c in counts_ckpt.values())       # the recomputation counted nothing
    router_grads = [n for n in grads if n.endswith("lora_router.weight")]
    assert router_grads and all(grads_ckpt[n] is not None for n in router_grads)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-9, atol=1e-12, msg=name)
    # the balance loss really is part of those gradients: without it the router gradients differ
    torch.manual_seed(7)
    no_aux(ids, attention_mask=mask, position_ids=pos, labels=ids).loss.backward()
    assert not torch.allclose(dict(no_aux.named_parameters())[router_grads[0]].grad, grads[router_grads[0]])
    if dropout:  # and the dropout really drew: another seed gives other gradients
        other = copy.deepcopy(no_aux)
        torch.manual_seed(8)
        other.zero_grad()
        other(ids, attention_mask=mask, position_ids=pos, labels=ids).loss.backward()
        assert not torch.allclose(dict(other.named_parameters())[router_grads[0]].grad,
                                  dict(no_aux.named_parameters())[router_grads[0]].grad)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_reentrant_checkpointing_refuses_a_balance_loss_backpropagated_alone():
    model = tiny_llama_double_with(CONFIGS["malora"])
    model.activation_checkpointing_enable({"use_reentrant": True})
    ids, mask, _ = padded()
    model(ids, attention_mask=mask)
    collect_aux_loss(model).backward()                                 # never reaches the routers
    with pytest.raises(RuntimeError, match=r"never reached the routers.*\(lm_loss \+ collect_aux_loss"):
        model(ids, attention_mask=mask)


def test_injection_is_atomic_and_retryable():
    model = tiny_llama(intermediate_size=32).eval()
    modules = {name: type(m) for name, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    bad = MALoRAConfig(d=48, r_bar=6, num_experts=4, top_k=2, target_modules=("q_proj", "down_proj"))
    with pytest.raises(ConfigError, match=r"d=48 exceeds the in_features 32"):    # q_proj (in 64) fits, down_proj not
        inject_adapters(model, bad)
    assert {name: type(m) for name, m in model.named_modules()} == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks and adapter_context(model) is None
    good = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=("q_proj", "down_proj"))
    assert len(inject_adapters(model, good)) == 4
    assert adapter_context(model).config == good
    assert remove_adapters(model) == [name for name in modules if name.endswith(("q_proj", "down_proj"))]
    assert {name: type(m) for name, m in model.named_modules()} == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks


def test_lora_has_no_aux_loss_and_no_routing_stats():
    model = tiny_llama().eval()
    inject_adapters(model, CONFIGS["lora"])
    model(IDS)
    assert collect_aux_loss(model).item() == 0.0 and routing_stats(model) == {}


@pytest.mark.parametrize("kind", ["lora", "malora"])
def test_gpt2_conv1d(kind):
    model = tiny_gpt2()
    with torch.no_grad():
        base_logits = model(IDS).logits
    cfg = type(CONFIGS[kind])(**{**CONFIGS[kind].to_dict(), "target_modules": ("c_attn", "c_fc")})
    replaced = inject_adapters(model, cfg)
    assert replaced == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                        "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base, Conv1D) and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base_logits)
    if kind == "lora":  # y = x W + b + (alpha/r) B A x with GPT-2's (in, out) weight
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(5, 32)
        expected = x @ layer.base.weight + layer.base.bias + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected)


def test_no_match_lists_candidates():
    with pytest.raises(ConfigError, match=r"matched no linear.*candidates \['down_proj', 'gate_proj', 'k_proj', "
                                          r"'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        inject_adapters(tiny_llama().eval(), LoRAConfig(target_modules=("query",)))
    with pytest.raises(ConfigError, match=r"candidates \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        inject_adapters(tiny_gpt2(), LoRAConfig())


def test_second_injection_is_refused_and_layers_are_listed():
    model = tiny_llama().eval()
    inject_adapters(model, LoRAConfig())
    layers = adapter_layers(model)
    assert not any(layer.training for _, layer in layers)             # injected into an eval model: eval mode
    assert all(isinstance(layer, LoRALinear) and isinstance(layer, AdapterLayer) for _, layer in layers)
    assert [name for name, _ in layers] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="already has adapters"):
        inject_adapters(model, LoRAConfig())
