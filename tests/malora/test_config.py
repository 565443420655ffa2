"""Config validation: one pytest.raises per rule, serialisation round trip, MALoRA dims."""

from __future__ import annotations

import dataclasses
import json

import pytest

from malora.config import (ConfigError, HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig,
                           config_from_dict, malora_dims)

ALL_DEFAULTS = [LoRAConfig(), MoLoRAConfig(), MALoRAConfig(), MoSLDConfig(), HydraLoRAConfig()]


@pytest.mark.parametrize("cfg", ALL_DEFAULTS + [
    MoSLDConfig(num_experts=(2, 2, 4, 4), top_k=2, dispatch="sparse"),
    MALoRAConfig(d=22, r_bar=8, beta=1.25, k0_is_expert=False, renormalize=True, balance_coef=0.001),
], ids=lambda c: c.kind)
def test_round_trip_through_json(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["kind"] == cfg.kind
    assert config_from_dict(d) == cfg


def test_lists_are_accepted_for_tuples():
    cfg = config_from_dict({"kind": "mosld", "num_experts": [2, 4], "target_modules": ["q_proj"]})
    assert cfg.num_experts == (2, 4) and cfg.target_modules == ("q_proj",)
    assert hash(cfg) == hash(MoSLDConfig(num_experts=(2, 4), target_modules=("q_proj",)))


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoRAConfig().r = 4


def test_paper_defaults():
    m = MALoRAConfig()
    assert (m.d, m.r_bar, m.num_experts, m.top_k, m.alpha / m.r_bar, m.balance_coef) == (32, 12, 8, 2, 2.0, 0.01)
    s = MoSLDConfig()
    assert (s.r, s.top_k, s.renormalize, s.dropconnect, s.target_modules) == (8, 2, True, 0.1, ("q_proj", "v_proj"))
    assert MoLoRAConfig().renormalize is False and HydraLoRAConfig().num_experts == 4


@pytest.mark.parametrize("make, match", [
    (lambda: LoRAConfig(r=0), r"LoRAConfig\.r=0 .*positive integer"),
    (lambda: MoLoRAConfig(r=-1), r"MoLoRAConfig\.r=-1"),
    (lambda: HydraLoRAConfig(r=2.5), r"HydraLoRAConfig\.r=2\.5"),
    (lambda: MoLoRAConfig(num_experts=0), r"num_experts=0"),
    (lambda: MoLoRAConfig(num_experts=2, top_k=3), r"top_k=3 .*exceeds the number of experts \(2\)"),
    (lambda: MALoRAConfig(top_k=0), r"top_k=0 .*positive integer"),
    (lambda: MALoRAConfig(d=0), r"MALoRAConfig\.d=0"),
    (lambda: MALoRAConfig(r_bar=-3), r"MALoRAConfig\.r_bar=-3"),
    (lambda: MALoRAConfig(d=8, r_bar=12), r"r_bar=12 .*exceeds d \(8\)"),
    (lambda: MALoRAConfig(beta=0.0), r"beta=0\.0 .*> 0"),
    (lambda: MoSLDConfig(dropconnect=1.0), r"dropconnect=1\.0 .*\[0, 1\)"),
    (lambda: MoSLDConfig(dropconnect=-0.1), r"dropconnect=-0\.1"),
    (lambda: LoRAConfig(dropout=1.5), r"dropout=1\.5 .*\[0, 1\)"),
    (lambda: LoRAConfig(alpha=0), r"alpha=0 .*> 0"),
    (lambda: MoLoRAConfig(balance_coef=-0.01), r"balance_coef=-0\.01 .*>= 0"),
    (lambda: LoRAConfig(target_modules=()), r"target_modules=\(\) .*empty"),
    (lambda: LoRAConfig(target_modules="q_proj"), r"target_modules='q_proj' .*tuple"),
    (lambda: LoRAConfig(target_modules=("model.q_proj",)), r"final module-name component"),
    (lambda: MoLoRAConfig(dispatch="fast"), r"dispatch='fast' .*one of"),
    (lambda: MoLoRAConfig(renormalize="yes"), r"renormalize='yes' .*true or false"),
    (lambda: MALoRAConfig(k0_is_expert=1), r"k0_is_expert=1"),
    (lambda: MoSLDConfig(num_experts=(2, 0, 4)), r"num_experts=\(2, 0, 4\) .*positive integer entries"),
    (lambda: MoSLDConfig(num_experts=(), top_k=1), r"num_experts=\(\)"),
    (lambda: MoSLDConfig(num_experts=(1, 4), top_k=2), r"top_k=2 .*exceeds the number of experts \(1\)"),
    (lambda: LoRAConfig(kind="molora"), r"LoRAConfig\.kind='molora'"),
    (lambda: config_from_dict({"kind": "lora", "rank": 8}), r"unknown key\(s\) \['rank'\].*valid keys .*'r'"),
    (lambda: config_from_dict({"kind": "vera"}), r"kind='vera' is unknown.*'malora'"),
    (lambda: config_from_dict({"r": 8}), r"kind=None is unknown"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_validation_rules(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_experts_for_layer():
    cfg = MoSLDConfig(num_experts=(2, 4, 6))
    assert [cfg.experts_for_layer(i, 3) for i in range(3)] == [2, 4, 6]
    assert MoLoRAConfig(num_experts=5).experts_for_layer(None, None) == 5
    with pytest.raises(ConfigError, match=r"has 3 per-layer entries but the model has 4 layers.*exactly 4"):
        cfg.experts_for_layer(0, 4)
    with pytest.raises(ConfigError, match=r"layer index is None"):
        cfg.experts_for_layer(None, 3)


def test_malora_dims():
    assert malora_dims(8, 8, 0.5) == (32, 12)   # paper main setting
    assert malora_dims(8, 8, 1.0) == (64, 8)    # "w/o asymmetry"
    assert malora_dims(4, 8, 0.5) == (16, 6)    # Table 11
    with pytest.raises(ConfigError, match=r"d=19\.2.*not positive integers"):
        malora_dims(8, 8, 0.3)
    with pytest.raises(ConfigError, match=r"lam=2\.0 .*\(0, 2\)"):
        malora_dims(8, 8, 2.0)
    with pytest.raises(ConfigError, match=r"positive integers"):
        malora_dims(0, 8, 0.5)
