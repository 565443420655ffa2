"""CUDA checks (marker `gpu`, skipped without CUDA): every dispatch path on the GPU equals the float64 CPU
reference, and a bf16 model with adapters trains with finite, fp32-close outputs."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from malora import collect_aux_loss, inject_adapters
from tests.malora.test_layers import CASES, make_layer, reference

pytestmark = pytest.mark.gpu


def check_dispatch_paths(device: str) -> None:
    """Each (method, dispatch) layer in float32 on ``device`` matches the per-token float64 reference on the CPU."""
    for kind, dispatch in CASES:
        layer64 = make_layer(kind, **({"dispatch": dispatch} if dispatch else {}))
        x64 = torch.randn(4, 33, layer64.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        expected = reference(layer64, x64)
        layer32 = layer64.to(device=device, dtype=torch.float32)
        y = layer32(x64.to(device=device, dtype=torch.float32))
        torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-4, atol=1e-4, msg=f"{kind}/{dispatch}")


def check_bf16_training_step(device: str) -> None:
    """bf16 base + adapters (kept in fp32 by design): loss finite and within 2 % of the fp32 model's loss."""
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    from malora import MALoRAConfig

    adapter = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, dropout=0.0, target_modules=("q_proj", "v_proj"))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        inject_adapters(model, adapter)
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + collect_aux_loss(model)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[dtype] = loss.item()
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.02 * abs(losses[torch.float32])


def test_dispatch_paths_on_cuda_match_reference():
    check_dispatch_paths("cuda")


def test_bf16_training_step_on_cuda():
    check_bf16_training_step("cuda")
