"""Parameter accounting: real counts == METHODS.md §1.5 formulas == the papers' figures (LLaMA-2-7B on meta)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from malora import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig,
                    analytic_trainable, count_parameters, inject_adapters)
from malora.params import ParamCount, layer_index, linear_dims, meta_llama, per_linear_trainable
from tests.tiny import small_llama

REPO = Path(__file__).resolve().parents[2]
QKV_FFN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
LAYERWISE = (2,) * 8 + (4,) * 8 + (6,) * 8 + (8,) * 8
LLAMA2_7B_TOTAL = 6_738_415_616


@pytest.fixture(scope="module")
def llama7b():
    return meta_llama()


# ------------------------------------------------------------------------------------------ formulas by hand
@pytest.mark.parametrize("cfg, expected", [
    (LoRAConfig(r=4), 4 * (10 + 6)),                                          # r(n+m)
    (MoLoRAConfig(r=4, num_experts=3), 3 * 4 * (10 + 6) + 3 * 10),            # N r(n+m) + N n
    (HydraLoRAConfig(r=4, num_experts=3), 4 * 10 + 3 * 4 * 6 + 3 * 10),       # r n + N r m + N n
    (MoSLDConfig(r=4, num_experts=3), 4 * 10 + 3 * 4 * 6 + 3 * 10),
    (MALoRAConfig(d=5, r_bar=2, num_experts=3), 5 * 10 + 3 * 2 * 5 + 3 * 2 * 6 + 3 * 10),  # d n + N r̄ d + N r̄ m + N n
])
def test_per_linear_formula(cfg, expected):
    assert per_linear_trainable(cfg, n=10, m=6) == expected


def test_per_layer_experts_need_layer_indices():
    cfg = MoSLDConfig(r=2, num_experts=(2, 4))
    assert analytic_trainable(cfg, [(0, 10, 6), (1, 10, 6)]) == (2 * 10 + 2 * 2 * 6 + 2 * 10) + (2 * 10 + 4 * 2 * 6 + 4 * 10)
    with pytest.raises(ConfigError, match="per-layer"):
        analytic_trainable(cfg, [(10, 6)])
    with pytest.raises(ConfigError, match="3 layers"):
        analytic_trainable(cfg, [(0, 10, 6)], num_layers=3)


def test_layer_index():
    assert layer_index("model.layers.17.mlp.up_proj") == 17
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None


# ---------------------------------------------------------------------------------------------- real counts
def test_count_parameters_counts_tied_weights_once():
    model = small_llama(tie_word_embeddings=True)
    count = count_parameters(model)
    embed = 50 * 32
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 48 + 2 * 32      # q,o + k,v (2 kv heads) + mlp + norms
    assert count == ParamCount(trainable=embed + 2 * per_layer + 32, total=embed + 2 * per_layer + 32)
    assert count.share == 1.0 and count.frozen == 0


@pytest.mark.parametrize("cfg", [
    LoRAConfig(r=4, target_modules=QKV_FFN),
    MoLoRAConfig(r=4, num_experts=3),
    MALoRAConfig(d=8, r_bar=4, num_experts=3),
    MoSLDConfig(r=4, num_experts=(2, 3)),
    HydraLoRAConfig(r=4, num_experts=3),
], ids=lambda c: c.kind)
def test_real_count_equals_formula_tiny(cfg):
    model = small_llama()
    base = count_parameters(model).total
    dims = linear_dims(model, cfg.target_modules)
    inject_adapters(model, cfg)
    count = count_parameters(model)
    assert count.trainable == analytic_trainable(cfg, dims)
    assert count.total == base + count.trainable
    assert count.share_of_base == count.trainable / base


def test_real_count_equals_formula_gpt2_conv1d():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    cfg = MALoRAConfig(d=8, r_bar=4, num_experts=2, target_modules=("c_attn", "c_fc"))
    dims = linear_dims(model, cfg.target_modules)
    assert dims == [(0, 32, 96), (0, 32, 128), (1, 32, 96), (1, 32, 128)]
    inject_adapters(model, cfg)
    assert count_parameters(model).trainable == analytic_trainable(cfg, dims)


# ----------------------------------------------------------------------------------- LLaMA-2-7B paper table
@pytest.mark.parametrize("cfg, trainable, share", [
    (LoRAConfig(r=64, alpha=128.0, target_modules=QKV_FFN), 143_130_624, 2.12),
    (MoLoRAConfig(), 151_191_552, 2.24),
    (MALoRAConfig(), 158_859_264, 2.36),
    (MALoRAConfig(d=22, r_bar=8, alpha=16.0), 109_142_016, 1.62),
    (LoRAConfig(r=8), 4_194_304, 0.06),
    (MoSLDConfig(num_experts=LAYERWISE), 13_893_632, 0.21),
], ids=["lora-r64", "molora-8xr8", "malora", "malora-small", "lora-r8-qv", "mosld"])
def test_llama2_7b_table(llama7b, cfg, trainable, share):
    assert count_parameters(llama7b).total == LLAMA2_7B_TOTAL
    model = copy.deepcopy(llama7b)
    inject_adapters(model, cfg)
    count = count_parameters(model)
    assert count.trainable == trainable
    assert count.trainable == analytic_trainable(cfg, linear_dims(llama7b, cfg.target_modules))
    assert count.frozen == LLAMA2_7B_TOTAL
    assert round(100 * count.share_of_base, 2) == share


def test_param_counts_benchmark_json(llama7b, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("param_counts", REPO / "benchmarks" / "param_counts.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "param_counts", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "meta_llama", lambda: llama7b)
    assert bench.main(["--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["all_match"] and result["base_total"] == LLAMA2_7B_TOTAL
    rows = {(r["method"], r["setting"]): r for r in result["rows"]}
    assert rows[("MoLA", "r=8, q,v, experts 2/4/6/8 per 8 layers")]["trainable"] == 22_282_240
    assert rows[("MALoRA w fixed S_A", "r_bar=16, d=32, S_A frozen")]["share_pct"] == pytest.approx(2.4655, abs=1e-4)
