"""save_adapter / load_adapter: bit-exact round trip for every method, strictness, clear errors."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from malora import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig,
                    adapter_layers, export_peft, inject_adapters, load_adapter, save_adapter)
from malora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, adapter_state_dict

QKV_FFN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = [
    LoRAConfig(r=4, target_modules=QKV_FFN),
    MoLoRAConfig(r=4, num_experts=3, dispatch="sparse"),
    MALoRAConfig(d=8, r_bar=4, num_experts=3),
    MoSLDConfig(r=4, num_experts=(2, 3)),
    HydraLoRAConfig(r=4, num_experts=3),
]
IDS = [c.kind for c in CONFIGS]


def tiny_llama(intermediate_size: int = 48) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50))


def adapted(cfg, intermediate_size: int = 48):
    """(base copy without adapters, model with ``cfg`` injected and every adapter tensor perturbed)."""
    model = tiny_llama(intermediate_size)
    base = copy.deepcopy(model)
    inject_adapters(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(0.1 * torch.randn_like(p))   # B != 0, so the adapters change the output
    return base, model


def logits(model, seed: int = 2) -> torch.Tensor:
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_save_load_bit_exact(cfg, tmp_path):
    base, model = adapted(cfg)
    assert not torch.equal(logits(model), logits(copy.deepcopy(base)))       # the adapters do something
    save_adapter(model, cfg, tmp_path)
    assert load_adapter(base, tmp_path) == cfg
    saved, loaded = adapter_state_dict(model), adapter_state_dict(base)
    assert saved.keys() == loaded.keys() and saved
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
    assert [n for n, p in base.named_parameters() if p.requires_grad] == list(loaded)   # only adapters train
    assert torch.equal(logits(model), logits(base))


def test_files_and_shared_tensor_saved_once(tmp_path):
    cfg = MALoRAConfig(d=8, r_bar=4, num_experts=3)
    _, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]      # no temp files left
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["config"] == cfg.to_dict() and meta["base_model"] is None
    assert meta["layers"] == [name for name, _ in adapter_layers(model)] and len(meta["layers"]) == 12
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["malora_format_version"] == "1"
    per_layer = ("lora_S_A", "lora_P", "lora_B", "lora_router.weight")
    assert keys == {f"{layer}.{p}" for layer in meta["layers"] for p in per_layer}
    assert "model.layers.0.self_attn.q_proj.lora_S_A" in keys
    assert sum(k.endswith("lora_S_A") for k in keys) == len(meta["layers"])            # S_A once per layer
    sizes = {k: v.numel() for k, v in load_file(str(tmp_path / WEIGHTS_NAME)).items()}
    assert sizes["model.layers.0.self_attn.q_proj.lora_S_A"] == 8 * 32                # (d, n), not N copies


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path, caplog):
    cfg = LoRAConfig(r=4)
    base, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    del tensors["model.layers.1.self_attn.v_proj.lora_B"]
    tensors["model.layers.9.self_attn.q_proj.lora_A"] = torch.zeros(4, 32)
    save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    flags = [p.requires_grad for p in base.parameters()]
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): model\.layers\.1\.self_attn\.v_proj\.lora_B"
                                              r".*unexpected keys \(1\): model\.layers\.9\.self_attn\.q_proj\.lora_A"):
        load_adapter(base, tmp_path)
    assert adapter_layers(base) == [] and [p.requires_grad for p in base.parameters()] == flags  # untouched
    with caplog.at_level(logging.WARNING, logger="malora.checkpoint"):
        assert load_adapter(base, tmp_path, strict=False) == cfg
    assert "missing keys" in caplog.text
    assert torch.equal(base.model.layers[0].self_attn.q_proj.lora_B, model.model.layers[0].self_attn.q_proj.lora_B)


def test_shape_mismatch_raises_even_when_not_strict(tmp_path):
    cfg = LoRAConfig(r=4, target_modules=("up_proj",))
    _, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    other = tiny_llama(intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): .*lora_B: checkpoint \(48, 4\) vs model \(64, 4\)"):
        load_adapter(other, tmp_path, strict=False)
    assert adapter_layers(other) == []


def test_model_with_other_adapters_is_refused(tmp_path):
    cfg = LoRAConfig(r=4)
    base, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    inject_adapters(base, LoRAConfig(r=4, alpha=8.0))                 # same shapes, different scaling
    with pytest.raises(CheckpointError, match="different config.*scaling=2.0.*Fix: load into a fresh base model"):
        load_adapter(base, tmp_path)
    other = tiny_llama()
    inject_adapters(other, LoRAConfig(r=2))
    with pytest.raises(CheckpointError, match="different config"):
        load_adapter(other, tmp_path)
    same = tiny_llama()
    inject_adapters(same, cfg)                                        # same config: weights are overwritten
    assert load_adapter(same, tmp_path) == cfg
    assert torch.equal(logits(same), logits(model))


def test_corrupt_or_missing_files(tmp_path):
    cfg = LoRAConfig(r=4)
    base, model = adapted(cfg)
    with pytest.raises(FileNotFoundError, match=f"{CONFIG_NAME} not found.*save_adapter"):
        load_adapter(base, tmp_path)
    save_adapter(model, cfg, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])                   # truncated
    with pytest.raises(CheckpointError, match=f"{weights} is not a readable safetensors file.*re-save"):
        load_adapter(base, tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=f"{WEIGHTS_NAME} not found"):
        load_adapter(base, tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_adapter(base, tmp_path)
    assert adapter_layers(base) == []


@pytest.mark.parametrize("edit, error, match", [
    (lambda m: m.update(format_version=2), CheckpointError, r"format_version=2 is not supported"),
    (lambda m: m.pop("format_version"), CheckpointError, r"no 'format_version'.*PEFT"),
    (lambda m: m.pop("layers"), CheckpointError, r"field 'layers' is missing"),
    (lambda m: m["config"].update(rank=3), ConfigError, r"adapter_config\.json: .*unknown key\(s\) \['rank'\]"),
], ids=["future-version", "no-version", "no-layers", "bad-config"])
def test_config_file_validation(tmp_path, edit, error, match):
    cfg = LoRAConfig(r=4)
    base, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    edit(meta)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(error, match=match):
        load_adapter(base, tmp_path)


def test_save_requires_adapters_matching_cfg_and_peft_export_requires_lora(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter layers"):
        save_adapter(tiny_llama(), LoRAConfig(), tmp_path)
    _, model = adapted(MoSLDConfig(r=4, num_experts=(2, 3)))
    with pytest.raises(CheckpointError, match=r"cfg does not describe.*num_experts=3"):
        save_adapter(model, MoSLDConfig(r=4, num_experts=(2, 2)), tmp_path)
    assert not any(tmp_path.iterdir())
    cfg = MoLoRAConfig(r=4, num_experts=3)
    _, model = adapted(cfg)
    with pytest.raises(ConfigError, match="kind='molora' has no PEFT equivalent"):
        export_peft(model, cfg, tmp_path)
