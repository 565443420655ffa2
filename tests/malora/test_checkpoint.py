"""save_adapter / load_adapter: bit-exact round trip for every method, strictness, clear errors."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from malora import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig,
                    adapter_layers, export_peft, inject_adapters, load_adapter, save_adapter)
from malora.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, adapter_state_dict
from tests.tiny import small_llama

QKV_FFN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = [
    LoRAConfig(r=4, target_modules=QKV_FFN),
    MoLoRAConfig(r=4, num_experts=3, dispatch="sparse"),
    MALoRAConfig(d=8, r_bar=4, num_experts=3),
    MoSLDConfig(r=4, num_experts=(2, 3)),
    HydraLoRAConfig(r=4, num_experts=3),
]
IDS = [c.kind for c in CONFIGS]


def adapted(cfg, intermediate_size: int = 48):
    """(base copy without adapters, model with ``cfg`` injected and every adapter tensor perturbed)."""
    model = small_llama(intermediate_size=intermediate_size)
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
    other = small_llama(intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): .*lora_B: checkpoint \(48, 4\) vs model \(64, 4\)"):
        load_adapter(other, tmp_path, strict=False)
    assert adapter_layers(other) == []


def test_model_with_other_adapters_is_refused(tmp_path):
    cfg = LoRAConfig(r=4)
    base, model = adapted(cfg)
    save_adapter(model, cfg, tmp_path)
    inject_adapters(base, LoRAConfig(r=4, alpha=8.0))                 # same shapes, different scaling
    with pytest.raises(CheckpointError, match="different config.*alpha: model has 8.0, given 16.0.*Fix: load into a "
                                              "fresh base model"):
        load_adapter(base, tmp_path)
    other = small_llama()
    inject_adapters(other, LoRAConfig(r=2))
    with pytest.raises(CheckpointError, match="different config"):
        load_adapter(other, tmp_path)
    same = small_llama()
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
        save_adapter(small_llama(), LoRAConfig(), tmp_path)
    _, model = adapted(MoSLDConfig(r=4, num_experts=(2, 3)))
    with pytest.raises(CheckpointError, match=r"cfg does not describe.*num_experts: model has \(2, 3\), given \(2, 2\)"):
        save_adapter(model, MoSLDConfig(r=4, num_experts=(2, 2)), tmp_path)
    assert not any(tmp_path.iterdir())
    cfg = MoLoRAConfig(r=4, num_experts=3)
    _, model = adapted(cfg)
    with pytest.raises(ConfigError, match="kind='molora' has no PEFT equivalent.*not LoRALinear"):
        export_peft(model, cfg, tmp_path)
    with pytest.raises(ConfigError, match=r"not LoRALinear.*kind: model has 'molora', given 'lora'"):
        export_peft(model, LoRAConfig(r=4, target_modules=QKV_FFN), tmp_path)    # a LoRA config, a MoLoRA model
    with pytest.raises(ConfigError, match="kind='molora' has no PEFT equivalent"):
        export_peft(model, out_dir=tmp_path)                           # config taken from the model
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("field, value", [
    ("balance_coef", 0.001), ("balance_reduction", "sum"), ("k0_is_expert", False), ("renormalize", True),
    ("dispatch", "sparse"), ("beta", 1.25),
])
def test_every_config_field_is_compared(tmp_path, field, value):
    cfg = MALoRAConfig(d=8, r_bar=4, num_experts=3)
    other = MALoRAConfig(**{**cfg.to_dict(), field: value})
    base, model = adapted(cfg)
    with pytest.raises(CheckpointError, match=rf"cfg does not describe.*{field}: model has .*, given {value!r}"):
        save_adapter(model, other, tmp_path)
    save_adapter(model, cfg, tmp_path)
    inject_adapters(base, other)                                      # same layers, same shapes, other field
    with pytest.raises(CheckpointError, match=rf"different config.*{field}: model has {value!r}"):
        load_adapter(base, tmp_path)


class QuantLinear(torch.nn.Linear):
    """Stands in for a quantised linear: an ``nn.Linear`` subclass with its own repr."""

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, int8"


def with_quant_linears(model):
    for name, module in list(model.named_modules()):
        if name.endswith(("q_proj", "v_proj")):
            quant = QuantLinear(module.in_features, module.out_features, bias=module.bias is not None)
            quant.load_state_dict(module.state_dict())
            model.set_submodule(name, quant)
    return model


def test_bases_that_subclass_linear_round_trip(tmp_path):
    cfg = MoLoRAConfig(r=4, num_experts=3)
    model = with_quant_linears(small_llama())
    base = copy.deepcopy(model)
    inject_adapters(model, cfg)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(0.1 * torch.randn_like(p))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, QuantLinear)
    save_adapter(model, cfg, tmp_path)
    assert load_adapter(base, tmp_path) == cfg
    assert torch.equal(logits(base), logits(model))
    assert load_adapter(base, tmp_path) == cfg                        # into its own adapters: overwritten


def test_load_is_atomic_when_the_config_fails_on_one_module(tmp_path):
    cfg = MALoRAConfig(d=24, r_bar=4, num_experts=3, target_modules=("q_proj", "down_proj"))
    _, model = adapted(cfg, intermediate_size=48)                      # q_proj in 32, down_proj in 48: d fits
    save_adapter(model, cfg, tmp_path / "wide")
    cfg_ok = MALoRAConfig(d=8, r_bar=4, num_experts=3, target_modules=("q_proj", "down_proj"))
    _, good = adapted(cfg_ok, intermediate_size=16)
    save_adapter(good, cfg_ok, tmp_path / "ok")
    narrow = small_llama(intermediate_size=16)                         # q_proj fits d=24, down_proj (in 16) not
    modules = {n: type(m) for n, m in narrow.named_modules()}
    flags = [p.requires_grad for p in narrow.parameters()]
    with pytest.raises(ConfigError, match="d=24 exceeds the in_features 16"):
        load_adapter(narrow, tmp_path / "wide")
    assert {n: type(m) for n, m in narrow.named_modules()} == modules
    assert [p.requires_grad for p in narrow.parameters()] == flags
    assert load_adapter(narrow, tmp_path / "ok") == cfg_ok            # retry on the same model works
    assert torch.equal(logits(narrow), logits(good))


@pytest.mark.parametrize("change", [dict(alpha=8.0), dict(r=2), dict(dropout=0.1),
                                    dict(target_modules=("q_proj", "v_proj"))], ids=lambda c: next(iter(c)))
def test_peft_export_refuses_a_config_other_than_the_injected_one(tmp_path, change):
    cfg = LoRAConfig(r=4, target_modules=QKV_FFN)
    _, model = adapted(cfg)
    field = next(iter(change))
    with pytest.raises(ConfigError, match=rf"export_peft: .*{field}: model has"):
        export_peft(model, LoRAConfig(**{**cfg.to_dict(), **change}), tmp_path)
    assert not any(tmp_path.iterdir())
    export_peft(model, out_dir=tmp_path)                               # no config: the injected one is used
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert (meta["r"], meta["lora_alpha"], meta["lora_dropout"]) == (cfg.r, cfg.alpha, cfg.dropout)
    assert meta["target_modules"] == sorted(QKV_FFN)
