"""CUDA checks (marker `gpu`, skipped without CUDA): every dispatch path on the GPU equals the float64 CPU
reference, routing never waits on the host where it need not (dense path: no sync; sparse: one per layer;
grouped through torch._grouped_mm on a Hopper-class GPU: none), the grouped paths in bf16 agree with the
reference and with the dense and sparse paths, and a bf16 model with non-zero adapters trains with finite,
fp32-close outputs.

Written for torch >= 2.4 and transformers >= 4.46 (the GPU machine may lag the CPU one: torch 2.11,
transformers 5.17); the torch._grouped_mm checks skip, with the reason, where torch lacks it."""
from __future__ import annotations

import warnings

import pytest
import torch

from malora import MALoRAConfig, adapter_layers, collect_aux_loss, inject_adapters
from malora.layers.grouped import IMPLS, default_impl, has_fast_grouped_mm
from tests.malora.test_grouped import check_grouped_mixture
from tests.malora.test_layers import CASES, CONFIGS, PAD_MASK, N_IN, ROUTED_TOPK, Holder, make_layer, reference
from tests.tiny import tiny_llama

pytestmark = pytest.mark.gpu


def check_dispatch_paths(device: str) -> None:
    """Each (method, dispatch) layer in float32 on ``device`` matches the per-token float64 reference on the CPU."""
    for kind, dispatch in CASES + [(k, "grouped") for k in ROUTED_TOPK]:   # grouped in fp32: the padded bmm
        layer64 = make_layer(kind, **({"dispatch": dispatch} if dispatch else {}))
        x64 = torch.randn(4, 33, layer64.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        expected = reference(layer64, x64)
        layer32 = layer64.to(device=device, dtype=torch.float32)
        y = layer32(x64.to(device=device, dtype=torch.float32))
        torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-4, atol=1e-4, msg=f"{kind}/{dispatch}")


def routed_holder(kind: str, dispatch: str | None, device: str) -> Holder:
    cfg = CONFIGS[kind]
    if dispatch:
        cfg = type(cfg)(**{**cfg.to_dict(), "dispatch": dispatch})
    return Holder(cfg).to(device=device, dtype=torch.float32)


def check_no_host_sync(device: str) -> None:
    """Dense routing (forward, balance loss, backward) runs with ``set_sync_debug_mode("error")``; the sparse
    path's forward syncs at most once (the per-expert group sizes)."""
    mask = PAD_MASK.to(device)
    x = torch.randn(3, 7, N_IN, device=device)
    for kind, dispatch in [("molora", "dense"), ("malora", "dense"), ("mosld", "dense"), ("hydra", None)]:
        holder = routed_holder(kind, dispatch, device)
        holder(x, attention_mask=mask).sum().backward()                # warm-up: allocations, lazy inits
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = holder(x, attention_mask=mask)
            (y.sum() + collect_aux_loss(holder)).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    for kind in ("molora", "malora", "mosld"):
        holder = routed_holder(kind, "sparse", device)
        holder(x, attention_mask=mask)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                holder(x, attention_mask=mask)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) <= 1, f"{kind}/sparse: {len(syncs)} host syncs in one layer forward"


def check_grouped_bf16(device: str) -> None:
    """Both grouped implementations in bf16 against the float64 reference (values and gradients), at unaligned
    dims (q, r, m padded for _grouped_mm) and at aligned ones with more tokens and experts."""
    impls = IMPLS if hasattr(torch, "_grouped_mm") else ("bmm",)
    for impl in impls:
        for shared in (False, True):
            check_grouped_mixture(impl, (12, 3, 10), shared, True, torch.bfloat16, device)
            check_grouped_mixture(impl, (64, 16, 96), shared, True, torch.bfloat16, device, T=300, N=8)


def check_grouped_layers_agree(device: str) -> None:
    """bf16 layers: dispatch="grouped" (on a Hopper-class GPU its default implementation is _grouped_mm) gives
    the output and gradients of "dense" and "sparse" on the same weights and routing, within bf16 rounding."""
    x = torch.randn(4, 33, N_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = x.to(device=device, dtype=torch.bfloat16)
    assert default_impl(x) == ("grouped_mm" if has_fast_grouped_mm(x.device) else "bmm")
    for kind in ROUTED_TOPK:
        results = {}
        for dispatch in ("dense", "sparse", "grouped"):
            layer = make_layer(kind, dispatch=dispatch).to(device=device, dtype=torch.bfloat16)  # same seed
            xg = x.detach().requires_grad_(True)
            y = layer(xg)
            (y * torch.linspace(-1, 1, y.shape[-1], device=device, dtype=y.dtype)).sum().backward()
            results[dispatch] = [y.detach(), xg.grad] + [p.grad for p in layer.adapter_params().values()]
        for dispatch in ("dense", "sparse"):
            for i, (a, e) in enumerate(zip(results["grouped"], results[dispatch], strict=True)):
                a, e = a.double(), e.double()
                assert (a - e).abs().max() <= 2e-2 * e.abs().max(), f"{kind}: grouped vs {dispatch}, tensor {i}"


def check_grouped_mm_no_host_sync(device: str) -> None:
    """dispatch="grouped" through _grouped_mm in bf16: forward, balance loss and backward never sync."""
    mask = PAD_MASK.to(device)
    x = torch.randn(3, 7, N_IN, device=device, dtype=torch.bfloat16)
    for kind in ROUTED_TOPK:
        holder = routed_holder(kind, "grouped", device).to(torch.bfloat16)
        holder(x, attention_mask=mask).float().sum().backward()          # warm-up: allocations, lazy inits
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = holder(x, attention_mask=mask)
            (y.float().sum() + collect_aux_loss(holder)).backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def check_bf16_training_step(device: str, dispatch: str = "auto") -> None:
    """bf16 base + adapters (kept in fp32 by design) with non-zero B: the adapters change the loss, which is
    finite and within 2 % of the fp32 model's loss."""
    adapter = MALoRAConfig(d=16, r_bar=6, num_experts=4, top_k=2, dropout=0.0, target_modules=("q_proj", "v_proj"),
                           dispatch=dispatch)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    losses, base_losses = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_llama().to(device=device, dtype=dtype)              # the same weights in both dtypes
        with torch.no_grad():
            base_losses[dtype] = model(input_ids=ids, attention_mask=mask, labels=ids).loss.item()
        inject_adapters(model, adapter)
        torch.manual_seed(1)
        with torch.no_grad():
            for _, layer in adapter_layers(model):
                layer.lora_B.normal_(0.0, 0.2)                         # fp32 in both models: same values
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss = out.loss + collect_aux_loss(model)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        losses[dtype] = out.loss.item()
    assert abs(losses[torch.float32] - base_losses[torch.float32]) > 1e-3   # the adapters do something
    assert abs(losses[torch.bfloat16] - losses[torch.float32]) <= 0.02 * abs(losses[torch.float32])


def test_dispatch_paths_on_cuda_match_reference():
    check_dispatch_paths("cuda")


def test_routing_does_not_sync_with_the_host():
    check_no_host_sync("cuda")


def test_grouped_paths_in_bf16_match_reference():
    check_grouped_bf16("cuda")


def test_grouped_layers_agree_with_dense_and_sparse_in_bf16():
    check_grouped_layers_agree("cuda")


def test_grouped_mm_path_does_not_sync_with_the_host():
    if not has_fast_grouped_mm(torch.device("cuda")):
        pytest.skip("torch._grouped_mm's no-sync kernel needs compute capability 9.x/10.x and torch >= 2.8")
    check_grouped_mm_no_host_sync("cuda")


@pytest.mark.parametrize("dispatch", ["auto", "grouped"])
def test_bf16_training_step_on_cuda(dispatch):
    check_bf16_training_step("cuda", dispatch)
