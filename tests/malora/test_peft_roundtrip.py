"""export_peft: our LoRA, exported, loads with peft.PeftModel.from_pretrained and gives the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from malora import LoRAConfig, export_peft, inject_adapters
from malora.checkpoint import CONFIG_NAME, adapter_state_dict
from tests.tiny import small_llama

peft = pytest.importorskip("peft")
# peft 0.21 calls a transformers 5 method that warns about its own deprecation; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _perturbed_lora(model, cfg):
    base = copy.deepcopy(model)
    inject_adapters(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            p.add_(0.1 * torch.randn_like(p))        # nonzero B
    return base, model


def _logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llama_lora_loads_in_peft(tmp_path):
    model = small_llama()
    cfg = LoRAConfig(r=4, alpha=12.0, dropout=0.1,
                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    base, model = _perturbed_lora(model, cfg)
    before = _logits(copy.deepcopy(base), 50)
    export_peft(model, cfg, tmp_path, base_model="tiny-llama")
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["lora_alpha"] == 12.0
    assert meta["base_model_name_or_path"] == "tiny-llama" and meta["fan_in_fan_out"] is False
    assert meta["target_modules"] == sorted(cfg.target_modules)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    ours, theirs = _logits(model, 50), _logits(peft_model, 50)
    assert not torch.allclose(ours, before, atol=1e-3)            # the adapter changes the output
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == 14 and lora_layers[0].scaling["default"] == 3.0


def test_gpt2_conv1d_lora_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16))
    cfg = LoRAConfig(r=4, target_modules=("c_attn", "c_proj", "c_fc"))
    base, model = _perturbed_lora(model, cfg)
    export_peft(model, cfg, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(_logits(peft_model, 50), _logits(model, 50), atol=1e-5, rtol=0)
