"""Injection into tiny config-built LLaMA and GPT-2 models, parametrised over every adapter kind."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from malora.config import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig)
from malora.inject import (adapter_layers, collect_aux_loss, inject_adapters, reset_routing_stats,
                           routing_stats)
from malora.layers import AdapterLayer, LoRALinear

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {
    "lora": LoRAConfig(r=4, target_modules=LLAMA_TARGETS),
    "molora": MoLoRAConfig(r=4, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS),
    "malora": MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, target_modules=LLAMA_TARGETS),
    "mosld": MoSLDConfig(r=4, num_experts=(2, 4), top_k=2),
    "hydra": HydraLoRAConfig(r=4, num_experts=3, target_modules=LLAMA_TARGETS),
}
ROUTED = ["molora", "malora", "mosld", "hydra"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=32, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_identity_at_init_and_only_adapters_train(kind):
    model = tiny_llama()
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
    model = tiny_llama()
    inject_adapters(model, CONFIGS["mosld"])
    experts = {name: layer.num_experts for name, layer in adapter_layers(model)}
    assert experts == {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 2,
                       "model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 4}
    with pytest.raises(ConfigError, match=r"has 3 per-layer entries but the model has 2 layers.*exactly 2"):
        inject_adapters(tiny_llama(), MoSLDConfig(num_experts=(2, 4, 6)))


@pytest.mark.parametrize("kind", ROUTED)
def test_routing_stats_and_aux_loss(kind):
    model = tiny_llama()
    inject_adapters(model, CONFIGS[kind])
    with torch.no_grad():
        model(IDS)
    stats = routing_stats(model)
    assert set(stats) == {name for name, _ in adapter_layers(model)}
    for name, frac in stats.items():
        torch.testing.assert_close(frac.sum(), torch.tensor(1.0, dtype=frac.dtype), msg=name)
        assert torch.all(frac >= 0)
    aux = collect_aux_loss(model)
    assert aux.dim() == 0
    if kind == "hydra":
        assert aux.item() == 0.0
    else:  # each layer's coef * N * sum f_i P_i lies in [coef, coef * N]
        layers = adapter_layers(model)
        coef = CONFIGS[kind].balance_coef
        assert len(layers) * coef * 0.999 <= aux.item() <= sum(coef * layer.num_experts for _, layer in layers)
        torch.testing.assert_close(aux, sum(layer.last_aux_loss for _, layer in layers))
    reset_routing_stats(model)
    assert all(torch.all(frac == 0) for frac in routing_stats(model).values())
    with torch.no_grad():
        model(IDS[:1])
    counts = [layer.lora_router.expert_counts.sum().item() for _, layer in adapter_layers(model)]
    assert set(counts) == {9 * getattr(CONFIGS[kind], "top_k", 1)}


def test_lora_has_no_aux_loss_and_no_routing_stats():
    model = tiny_llama()
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
        inject_adapters(tiny_llama(), LoRAConfig(target_modules=("query",)))
    with pytest.raises(ConfigError, match=r"candidates \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"):
        inject_adapters(tiny_gpt2(), LoRAConfig())


def test_second_injection_is_refused_and_layers_are_listed():
    model = tiny_llama()
    inject_adapters(model, LoRAConfig())
    layers = adapter_layers(model)
    assert not any(layer.training for _, layer in layers)             # injected into an eval model: eval mode
    assert all(isinstance(layer, LoRALinear) and isinstance(layer, AdapterLayer) for _, layer in layers)
    assert [name for name, _ in layers] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ConfigError, match="already has adapters"):
        inject_adapters(model, LoRAConfig())
