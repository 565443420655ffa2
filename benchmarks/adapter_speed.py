"""Adapter speed and memory: forward+backward step time and peak memory per method, in one process.

Suites
- ``linear``: one frozen linear (4096->4096 and 4096->11008) with T tokens; x requires grad (the layer sits
  inside a network, so dx is computed) and a fixed upstream gradient is back-propagated.
- ``model``: a config-built LLaMA-style causal LM (hidden 1024, LLaMA's 2.6875 FFN ratio, few layers); loss =
  LM loss + the adapters' balance loss; adapters on q, k, v, gate, up, down (the MALoRA paper's targets).

Variants: frozen base, our LoRA r=64 (alpha 128), peft LoRA r=64, MoLoRA 8 x r8 top-2 as usually written (a
per-expert Python loop), our MoLoRA with sparse and with dense dispatch ("fastest" = the better of the two),
MALoRA (r_bar=12, d=32, dispatch auto, plus the other explicit path), MoSLD (r=8, N=8), HydraLoRA (r=8, N=4),
and two *prototypes* defined here (not library code, see ``AddmmAdapter``): the same LoRA / MALoRA layers with
the scaling folded into the low-rank activations, the up-projection accumulated into the frozen output by one
in-place ``addmm_``, and input dropout that saves a 1-byte mask.

Timing: ``--repeats`` rounds after ``--warmup`` rounds; each round runs every variant once, in an order
rotated by one per round, so machine drift (other jobs on shared cores) hits all variants alike; we report the
median. On CPU the default clock is the process's CPU time (``--clock cpu``): on cores shared with other jobs,
wall time mostly measures how long we were descheduled; with ``--threads 1`` CPU time is the ops' own cost
(with several threads it also counts OpenMP spin-waiting). ``--clock wall`` is available for quiet machines.

Memory: CUDA -> ``torch.cuda.max_memory_allocated`` minus the memory allocated before the step; CPU -> the
peak of live tensor bytes allocated during the step (activations, temporaries between ops, gradients), tracked
op by op with a TorchDispatchMode (storages freed are dropped via weak references); tensors that existed
before the step (weights, inputs) are excluded, and workspace used *inside* one op is not seen.

``--json``: the last line of output is one JSON object with every number.

GPU (``--preset gpu --device cuda``, run by ``benchmarks/gpu_check.sh``): bf16; LoRA r64 against MoLoRA,
MALoRA and MoSLD with each dispatch path, including ``grouped`` (``malora.layers.grouped``: ``torch._grouped_mm``,
and ``*_grouped_bmm`` = the same layers forced onto the padded-bmm implementation); linear layers at SmolLM2-135M
(576/1536) and LLaMA-2-7B (4096/11008) dims with 4096 and 16384 tokens, plus config-built SmolLM2-135M (30
layers, 8 x 512 tokens) and two LLaMA-2-7B layers (4 x 1024 tokens). Each step is timed with CUDA events after
a synchronise. Before timing, each routed variant's eval-mode output is compared with its method's ``*_dense``
variant on the same weights (``check``: max |diff| / max |ref|), and a variant whose first step raises is
dropped and listed under ``errors`` (exit code 1). ``--budget-s`` stops starting suites after that many seconds;
``--json-out`` rewrites the JSON file after every suite, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from malora import (HydraLoRAConfig, LoRAConfig, MALoRAConfig, MoLoRAConfig, MoSLDConfig, adapter_layers,
                    build_adapter_layer, collect_aux_loss, inject_adapters)
from malora.layers.base import gate_matrix
from malora.layers.grouped import use_impl

TARGETS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS: dict[str, object] = {
    "frozen": None,
    "lora_r64": LoRAConfig(r=64, alpha=128.0, target_modules=TARGETS),
    "peft_lora_r64": "peft",
    "molora_loop": MoLoRAConfig(dispatch="loop"),
    "molora_sparse": MoLoRAConfig(dispatch="sparse"),
    "molora_dense": MoLoRAConfig(dispatch="dense"),
    "malora": MALoRAConfig(),                       # dispatch="auto", as shipped
    "malora_sparse": MALoRAConfig(dispatch="sparse"),
    "malora_dense": MALoRAConfig(dispatch="dense"),
    "mosld": MoSLDConfig(r=8, num_experts=8, target_modules=TARGETS),
    "hydra": HydraLoRAConfig(r=8, num_experts=4, target_modules=TARGETS),
    "proto_lora": ("prototype", LoRAConfig(r=64, alpha=128.0, target_modules=TARGETS)),
    "proto_malora": ("prototype", MALoRAConfig()),
    "malora_p0": MALoRAConfig(dropout=0.0),         # what input dropout costs
    "proto_malora_p0": ("prototype", MALoRAConfig(dropout=0.0)),
    # the shipped layers with the fused input side off (malora.layers.fused): its baseline, side by side
    "lora_r64_sep": ("separate", LoRAConfig(r=64, alpha=128.0, target_modules=TARGETS)),
    "malora_sep": ("separate", MALoRAConfig()),
    # every dispatch path of the three routed methods (the GPU preset's comparison); *_grouped_bmm forces the
    # grouped dispatch onto its padded-bmm implementation (on CUDA bf16 "grouped" itself runs torch._grouped_mm)
    "molora_grouped": MoLoRAConfig(dispatch="grouped"),
    "molora_grouped_bmm": ("bmm", MoLoRAConfig(dispatch="grouped")),
    "malora_grouped": MALoRAConfig(dispatch="grouped"),
    "malora_grouped_bmm": ("bmm", MALoRAConfig(dispatch="grouped")),
    **{f"mosld_{d}": MoSLDConfig(r=8, num_experts=8, target_modules=TARGETS, dispatch=d)
       for d in ("sparse", "dense", "grouped")},
    "mosld_grouped_bmm": ("bmm", MoSLDConfig(r=8, num_experts=8, target_modules=TARGETS, dispatch="grouped")),
}
GPU_VARIANTS = ["frozen", "lora_r64", "molora_loop"] + [f"{m}_{d}" for m in ("molora", "malora", "mosld")
                                                       for d in ("sparse", "dense", "grouped", "grouped_bmm")]
# malora_dense = "malora" whenever auto picks dense (it does at the default shapes); *_p0 are diagnostics;
# the CPU default list stays what it was before the grouped variants
DEFAULT_SKIP = ("malora_dense", "malora_p0", "proto_malora_p0", "molora_grouped", "molora_grouped_bmm",
                "malora_grouped", "malora_grouped_bmm", "mosld_sparse", "mosld_dense", "mosld_grouped",
                "mosld_grouped_bmm")
CHECK_AGAINST = {"molora": "molora_dense", "malora": "malora_dense", "mosld": "mosld_dense"}  # same weights
# the two most telling first: --budget-s may cut the list short
GPU_SHAPES = [(576, 1536), (4096, 11008), (576, 576), (1536, 576), (4096, 4096), (11008, 4096)]
MODEL_PRESETS = {  # config-built, random weights: the shapes of the real models, nothing downloaded
    "smollm2-135m": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
                     "vocab": 49152, "batch": 8, "seq": 512, "tie": True},
    "llama2-7b-2l": {"hidden": 4096, "intermediate": 11008, "layers": 2, "heads": 32, "kv_heads": 32,
                     "vocab": 32000, "batch": 4, "seq": 1024, "tie": False},
}
QUICK_SKIP = ("malora_sparse", *DEFAULT_SKIP)
TARGET_RATIOS = [  # (name, numerator, denominator or "molora_fastest", bound, metric)
    ("MALoRA / frozen base", "malora", "frozen", 1.10, "ms"),
    ("MALoRA / our LoRA r64", "malora", "lora_r64", 1.03, "ms"),
    ("MALoRA / loop MoLoRA", "malora", "molora_loop", 0.80, "ms"),
    ("MALoRA / our fastest MoLoRA", "malora", "molora_fastest", 1.00, "ms"),
    ("our LoRA / peft LoRA", "lora_r64", "peft_lora_r64", 1.00, "ms"),
    ("MALoRA / LoRA r64 peak memory", "malora", "lora_r64", 1.05, "peak_mb"),
    ("MALoRA / MALoRA separate ops", "malora", "malora_sep", 1.00, "ms"),  # the fused input side's gain
    ("LoRA r64 / LoRA r64 separate ops", "lora_r64", "lora_r64_sep", 1.00, "ms"),
    # the same targets for the prototype formulation (AddmmAdapter), MALoRA and LoRA both prototyped
    ("proto MALoRA / frozen base", "proto_malora", "frozen", 1.10, "ms"),
    ("proto MALoRA / proto LoRA r64", "proto_malora", "proto_lora", 1.03, "ms"),
    ("proto MALoRA / loop MoLoRA", "proto_malora", "molora_loop", 0.80, "ms"),
    ("proto MALoRA / our fastest MoLoRA", "proto_malora", "molora_fastest", 1.00, "ms"),
    ("proto LoRA / peft LoRA", "proto_lora", "peft_lora_r64", 1.00, "ms"),
    ("proto MALoRA / proto LoRA r64 peak memory", "proto_malora", "proto_lora", 1.05, "peak_mb"),
    # grouped dispatch (GPU preset): issue 19's target MALoRA >= 0.95 x LoRA r64 throughput, i.e. ms <= 1/0.95
    ("MALoRA grouped / our LoRA r64", "malora_grouped", "lora_r64", 1.053, "ms"),
    ("MALoRA grouped / MALoRA dense", "malora_grouped", "malora_dense", 1.00, "ms"),
    ("MALoRA grouped / MALoRA grouped bmm", "malora_grouped", "malora_grouped_bmm", 1.00, "ms"),
    ("MoLoRA grouped / our fastest MoLoRA", "molora_grouped", "molora_fastest", 1.00, "ms"),
    ("MoSLD grouped / MoSLD dense", "mosld_grouped", "mosld_dense", 1.00, "ms"),
    ("MALoRA grouped / LoRA r64 peak memory", "malora_grouped", "lora_r64", 1.05, "peak_mb"),
]


# ---------------------------------------------------------------------------------------------- prototypes
class DropoutLinear(torch.autograd.Function):
    """``dropout(x) @ W^T`` that saves x and a 1-byte mask instead of dropout(x) and a float mask.

    Stock CPU dropout keeps a float mask and the dropped copy of x (8 bytes per element of the (T, n) input)
    for backward; here x (already alive, and shared with the router and the sibling q/k/v adapters) and a bool
    mask (1 byte) are kept, and x * mask is recomputed in backward. The 1/(1-p) scale is applied to the small
    W and dW, not to the (T, n) tensors.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        # rand >= p keeps with probability 1 - p; on CPU this is ~1.6x faster than bernoulli_, and where() is
        # ~5x faster than multiplying by a bool mask (which goes through a slow type-promotion path)
        mask = torch.rand_like(x) >= p                                        # (T, n) bool
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(x, mask, weight)
        ctx.scale = scale
        return F.linear(torch.where(mask, x, 0.0), weight * scale)            # (T, r)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask, weight = ctx.saved_tensors
        dx = dW = None
        if ctx.needs_input_grad[0]:
            dx = torch.where(mask, grad @ (weight * ctx.scale), 0.0)          # (T, n)
        if ctx.needs_input_grad[1]:
            dW = (grad.T @ torch.where(mask, x, 0.0)).mul_(ctx.scale)         # (r, n)
        return dx, dW, None


def dropout_linear(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    p = getattr(layer.dropout, "p", 0.0)                                   # InputDropout or nn.Identity
    if layer.training and p > 0:
        return DropoutLinear.apply(x, weight, p)
    return F.linear(x, weight)


class AddmmAdapter(nn.Module):
    """Prototype forward for a wrapped LoRA or MALoRA layer (same parameters, same math, fewer passes/bytes).

    1. Epilogue: the library computes ``base(x) + scaling * delta(x)``: after the up-projection GEMM it makes
       two more passes over a (T, m) tensor (``scaling *`` and ``+``) and holds two extra (T, m) buffers, and
       autograd makes one more pass in backward. Here the scaling and the top-k gates are folded into the small
       (T, r) activations and the up-projection is accumulated into the base output by the GEMM itself, in
       place: ``base(x).addmm_(h, B_cat^T)`` (BLAS beta = 1).
    2. Input dropout through :class:`DropoutLinear` (x and a bool mask saved, not x_dropped and a float mask;
       mask drawn with rand >= p and applied with where(), both cheaper than stock CPU dropout).
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.layer
        x2 = x.reshape(-1, L.in_features)                                    # (T, n)
        y = L.base(x2)                                                       # (T, m)
        if hasattr(L, "lora_S_A"):
            route = L.lora_router(x2)
            L.last_aux_loss = route.aux_loss
            if L.routing_context is not None:                                 # as AdapterLayer.forward records it
                L.aux_generation = L.routing_context.generation
            N, r_bar, d = L.lora_P.shape
            z = dropout_linear(L, x2, L.lora_S_A.to(x.dtype))                # (T, d)
            h = F.linear(z, L.lora_P.to(x.dtype).reshape(N * r_bar, d))       # (T, N*r_bar)
            g = gate_matrix(route.gates, route.idx, N) * L.scaling           # (T, N) scaled gates
            h = (h.view(-1, N, r_bar) * g.unsqueeze(-1)).view(-1, N * r_bar)  # (T, N*r_bar)
            up = L.lora_B.to(x.dtype).permute(1, 0, 2).reshape(L.out_features, N * r_bar)  # (m, N*r_bar)
        else:
            h = dropout_linear(L, x2, L.lora_A.to(x.dtype)) * L.scaling      # (T, r)
            up = L.lora_B.to(x.dtype)                                        # (m, r)
        # In place: the frozen matmul's backward needs x and W, never its output, so y may be overwritten.
        return y.addmm_(h, up.T).view(*x.shape[:-1], L.out_features)        # (..., m)


def _prototype_model(model: nn.Module) -> None:
    for name, layer in adapter_layers(model):
        model.set_submodule(name, AddmmAdapter(layer))


# ------------------------------------------------------------------------------------------------- memory
class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive, checked at every op boundary."""

    def __init__(self, preexisting: list[torch.Tensor]) -> None:
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in preexisting}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def _purge(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._purge()
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.ignore or key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_peak_mb(step: Callable[[], None], preexisting: list[torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with PeakTensorMemory(preexisting) as tracker:
        step()
    return tracker.peak / 2**20


# ------------------------------------------------------------------------------------------------- variants
def _peft_wrap(module: nn.Module, targets: list[str]) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05, target_modules=targets)
    return peft.inject_adapter_in_model(cfg, module)


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ForcedImpl(nn.Module):
    """Runs the wrapped module with every grouped dispatch on one implementation (malora.layers.grouped)."""

    def __init__(self, module: nn.Module, impl: str) -> None:
        super().__init__()
        self.module, self.impl = module, impl

    def forward(self, *args, **kwargs):
        with use_impl(self.impl):
            return self.module(*args, **kwargs)


def _randomise_adapters(module: nn.Module) -> None:
    """Nonzero B (and routers that do not all agree), so no path can skip work on zeros. Seeded: variants of one
    method (same shapes) get the same weights, so their outputs can be compared (``check``)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name and p.requires_grad:
                p.normal_(0.0, 0.02)


def build_linear_variant(name: str, base: nn.Linear) -> nn.Module:
    spec = VARIANTS[name]
    if spec is None:
        return base
    if spec == "peft":
        module = _peft_wrap(_Holder(base), ["proj"])
    elif isinstance(spec, tuple) and spec[0] == "separate":
        module = build_adapter_layer(base, spec[1])
        module.fused_input = False
    elif isinstance(spec, tuple) and spec[0] == "bmm":
        module = ForcedImpl(build_adapter_layer(base, spec[1]), "bmm")
    elif isinstance(spec, tuple):
        module = AddmmAdapter(build_adapter_layer(base, spec[1]))
    else:
        module = build_adapter_layer(base, spec)
    _randomise_adapters(module)
    return module


def build_model_variant(name: str, base_model: nn.Module) -> nn.Module:
    spec = VARIANTS[name]
    model = copy.deepcopy(base_model)
    if spec is None:
        model.requires_grad_(False)
    elif spec == "peft":
        model = _peft_wrap(model, list(TARGETS))
    elif isinstance(spec, tuple):
        inject_adapters(model, spec[1])
        if spec[0] == "separate":
            for _, layer in adapter_layers(model):
                layer.fused_input = False
        elif spec[0] == "bmm":
            model = ForcedImpl(model, "bmm")
        else:
            _prototype_model(model)
    else:
        inject_adapters(model, spec)
    _randomise_adapters(model)
    return model


# ----------------------------------------------------------------------------------------------- run suites
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(step: Callable[[], None], device: torch.device, now: Callable[[], float]) -> float:
    """One step's time in ms: CUDA events around it on an idle stream (so the span includes launch gaps), or
    ``now()`` before and after on the CPU."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = now()
    step()
    return (now() - t0) * 1e3


def run_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                    device: torch.device, clock: str = "wall") -> dict[str, list[float]]:
    """Time every step ``repeats`` times (after ``warmup`` rounds), round-robin with a rotating start.

    ``clock="wall"``: elapsed time (on CUDA: CUDA events). ``clock="cpu"``: this process's CPU time
    (``time.process_time``), which does not count time the process spends descheduled by other jobs.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for n in order:
            ms = _time_ms(steps[n], device, now)
            if rnd >= warmup:
                times[n].append(ms)
    return times


def drop_failing(steps: dict[str, Callable[[], None]], errors: dict[str, str]) -> None:
    """Run each step once; a step that raises is removed from ``steps`` and its error kept in ``errors`` (the
    other variants are still measured; main exits 1)."""
    for name in list(steps):
        try:
            steps[name]()
        except Exception as exc:  # noqa: BLE001  (a benchmark reports a failing variant and measures the rest)
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]
            del steps[name]


@torch.no_grad()
def check_outputs(outputs: dict[str, Callable[[], torch.Tensor]]) -> dict[str, dict]:
    """max |y - y_ref| / max |y_ref| of each routed variant's eval-mode output against its method's dense
    variant (same weights: ``_randomise_adapters`` is seeded), where that variant is in the run."""
    refs: dict[str, torch.Tensor] = {}
    result = {}
    for name, run in outputs.items():
        ref_name = CHECK_AGAINST.get(name.split("_")[0])
        if ref_name is None or ref_name == name or ref_name not in outputs:
            continue
        try:
            if ref_name not in refs:
                refs[ref_name] = outputs[ref_name]().float()
            ref, y = refs[ref_name], run().float()
        except Exception as exc:  # noqa: BLE001  (reported; drop_failing then drops the variant)
            result[name] = {"vs": ref_name, "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        result[name] = {"vs": ref_name, "max_rel_err": float((y - ref).abs().max() / ref.abs().max())}
    return result


def _eval_output(module: nn.Module, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        module.eval()
        try:
            return fn()
        finally:
            module.train()
    return run


def linear_suite(n: int, m: int, tokens: int, names: list[str], args, device, dtype) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, m, device=device, dtype=dtype)
    modules = {name: build_linear_variant(name, base).train() for name in names}

    def make_step(module: nn.Module) -> Callable[[], None]:
        def step() -> None:
            module(x).backward(grad)
            x.grad = None
            for p in module.parameters():
                p.grad = None
        return step

    check = check_outputs({name: _eval_output(mod, lambda mod=mod: mod(x)) for name, mod in modules.items()})
    steps = {name: make_step(mod) for name, mod in modules.items()}
    errors: dict[str, str] = {}
    drop_failing(steps, errors)
    times = run_interleaved(steps, args.repeats, args.warmup, device, args.clock)
    pre = [x, grad] + [t for mod in modules.values() for t in [*mod.parameters(), *mod.buffers()]]
    peaks = {name: measure_peak_mb(steps[name], pre, device) for name in steps}
    dispatch = {name: mod.resolve_dispatch(tokens) for name, mod in modules.items()
                if hasattr(mod, "resolve_dispatch")}
    return {**_summarise(f"linear {n}->{m}", {"tokens": tokens, "n": n, "m": m}, times, peaks, dispatch),
            "check": check, "errors": errors}


def model_spec(preset: str, args) -> dict:
    """A MODEL_PRESETS entry, or "custom": ``--hidden/--layers/--batch/--seq/--vocab`` (LLaMA's FFN ratio)."""
    if preset != "custom":
        return {"name": preset, **MODEL_PRESETS[preset]}
    return {"name": "custom", "hidden": args.hidden, "intermediate": int(args.hidden * 2.6875), "layers": args.layers,
            "heads": args.hidden // 64, "kv_heads": args.hidden // 64, "vocab": args.vocab, "batch": args.batch,
            "seq": args.seq, "tie": False}


def model_suite(names: list[str], spec: dict, args, device, dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
                      num_key_value_heads=spec["kv_heads"], vocab_size=spec["vocab"],
                      max_position_embeddings=max(2048, spec["seq"]), tie_word_embeddings=spec["tie"])
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), device=device)
    # Embeddings that require grad: the frozen base then has a backward too, and every variant back-propagates
    # through all layers (as a block deep inside a real network would).
    embeds = base_model.get_input_embeddings()(ids).detach().requires_grad_(True)   # (B, S, h)
    models = {name: build_model_variant(name, base_model).train() for name in names}
    del base_model

    def make_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            loss = model(inputs_embeds=embeds, labels=ids).loss + collect_aux_loss(model)
            loss.backward()
            model.zero_grad(set_to_none=True)
            embeds.grad = None
        return step

    check = check_outputs({name: _eval_output(model, lambda model=model: model(inputs_embeds=embeds).logits)
                           for name, model in models.items()})
    steps = {name: make_step(model) for name, model in models.items()}
    errors: dict[str, str] = {}
    drop_failing(steps, errors)
    times = run_interleaved(steps, args.repeats, args.warmup, device, args.clock)
    pre = [ids, embeds] + [t for model in models.values() for t in [*model.parameters(), *model.buffers()]]
    peaks = {name: measure_peak_mb(steps[name], pre, device) for name in steps}
    shape = {k: spec[k] for k in ("hidden", "intermediate", "layers", "batch", "seq", "vocab")}
    shape["tokens"] = spec["batch"] * spec["seq"]
    title = f"LLaMA-style model h={spec['hidden']} L={spec['layers']}"
    if spec["name"] != "custom":
        title += f" ({spec['name']} shapes)"
    return {**_summarise(title, shape, times, peaks, {}), "check": check, "errors": errors}


def _summarise(title: str, shape: dict, times: dict, peaks: dict, dispatch: dict) -> dict:
    med = {n: statistics.median(t) for n, t in times.items()}
    variants = {n: {"ms": round(med[n], 3), "ms_all": [round(v, 3) for v in times[n]],
                    "peak_mb": round(peaks[n], 3)} for n in times}
    molora = [n for n in ("molora_sparse", "molora_dense") if n in med]
    fastest = min(molora, key=med.get) if molora else None
    ratios = []
    for label, num, den, bound, metric in TARGET_RATIOS:
        den_name = fastest if den == "molora_fastest" else den
        if num not in variants or den_name not in variants:
            continue
        value = variants[num][metric] / variants[den_name][metric]
        ratios.append({"target": label, "metric": metric, "value": round(value, 4), "bound": bound,
                       "ok": value <= bound, "vs": den_name})
    return {"title": title, "shape": shape, "variants": variants, "molora_fastest": fastest,
            "auto_dispatch": dispatch, "ratios": ratios}


def format_suite(s: dict) -> str:
    frozen = s["variants"].get("frozen", {}).get("ms")
    lines = [f"### {s['title']}  {s['shape']}",
             f"| variant | median ms ({s.get('clock', 'wall')} clock) | x frozen | peak MiB | runs (ms) |", "|---|---:|---:|---:|---|"]
    for name, v in s["variants"].items():
        rel = f"{v['ms'] / frozen:.3f}" if frozen else "-"
        runs = " ".join(f"{t:.0f}" if t >= 10 else f"{t:.2f}" for t in v["ms_all"])
        lines.append(f"| {name} | {v['ms']:.1f} | {rel} | {v['peak_mb']:.1f} | {runs} |")
    if s["auto_dispatch"]:
        lines.append(f"dispatch chosen by auto: {s['auto_dispatch']}; fastest MoLoRA: {s['molora_fastest']}")
    if s.get("check"):
        lines.append("output vs the method's dense variant (max rel. err.): " + ", ".join(
            f"{n} {c['max_rel_err']:.1e}" if "error" not in c else f"{n} failed" for n, c in s["check"].items()))
    for name, err in s.get("errors", {}).items():
        lines.append(f"FAILED {name}: {err}")
    lines += ["", "| target | ratio | bound | ok |", "|---|---:|---:|:-:|"]
    for r in s["ratios"]:
        lines.append(f"| {r['target']} (vs {r['vs']}) | {r['value']:.3f} | {r['bound']:.2f} | "
                     f"{'✓' if r['ok'] else '✗'} |")
    return "\n".join(lines)


def format_summary(suites: list[dict], names: list[str]) -> str:
    """One row per suite: each variant's median ms, and the best MALoRA path's time over LoRA r64's."""
    lines = ["### summary: median ms per step (forward + backward)",
             "| suite | tokens | " + " | ".join(names) + " | best MALoRA / LoRA r64 |",
             "|---|---:|" + "---:|" * (len(names) + 1)]
    for s in suites:
        v = s["variants"]
        cells = [f"{v[n]['ms']:.2f}" if n in v else "-" for n in names]
        malora = [v[n]["ms"] for n in v if n.startswith("malora")]
        best = f"{min(malora) / v['lora_r64']['ms']:.3f}" if malora and "lora_r64" in v else "-"
        lines.append(f"| {s['title']} | {s['shape']['tokens']} | " + " | ".join(cells) + f" | {best} |")
    return "\n".join(lines)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Adapter forward+backward speed and peak memory.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default float32 (gpu preset: bf16)")
    p.add_argument("--preset", choices=("default", "gpu"), default="default",
                   help="gpu: bf16, every dispatch path of MoLoRA/MALoRA/MoSLD incl. grouped vs LoRA r64, at "
                        "SmolLM2-135M and LLaMA-2-7B shapes (linear layers and config-built models)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds, median reported (default 5; gpu 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; gpu 3)")
    p.add_argument("--tokens", default=None,
                   help="comma list of token counts for the linear suite (cpu 1024, cuda 16384; gpu 4096,16384)")
    p.add_argument("--shapes", default=None, help="comma list of NxM linear shapes (default 4096x4096,4096x11008)")
    p.add_argument("--models", default=None,
                   help=f"comma list for the model suite: custom (--hidden ...) or {list(MODEL_PRESETS)}")
    p.add_argument("--suites", default="linear,model", help="comma list of linear, model")
    p.add_argument("--variants", default=None, help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="wall: elapsed time; cpu: process CPU time, robust to other jobs on shared cores "
                        "(exact op cost with --threads 1). Default: cpu on --device cpu, wall on cuda")
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a < 60 s smoke test")
    p.add_argument("--budget-s", type=float, default=None, help="start no further suite after this many seconds")
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every number")
    p.add_argument("--json-out", default=None, help="also write that JSON to this file, after every suite")
    args = p.parse_args(argv)
    gpu = args.preset == "gpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.repeats = args.repeats if args.repeats is not None else (10 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" else "wall"
    if args.clock == "cpu" and device.type == "cuda":
        print("error: --clock cpu cannot time CUDA kernels; use --clock wall", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    default_names = GPU_VARIANTS if gpu else [n for n in VARIANTS if n not in DEFAULT_SKIP]
    names = args.variants.split(",") if args.variants else default_names
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        shapes = ([tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes
                  else GPU_SHAPES if gpu else [(4096, 4096), (4096, 11008)])
        token_counts = ([int(t) for t in args.tokens.split(",")] if args.tokens
                        else [4096, 16384] if gpu else [16384 if device.type == "cuda" else 1024])
    except ValueError:
        print(f"error: --shapes takes NxM,... and --tokens T,... (got {args.shapes!r}, {args.tokens!r})",
              file=sys.stderr)
        return 2
    models = args.models.split(",") if args.models else (list(MODEL_PRESETS) if gpu else ["custom"])
    if set(models) - {"custom", *MODEL_PRESETS}:
        print(f"error: unknown models {sorted(set(models) - {'custom', *MODEL_PRESETS})}; choose from "
              f"{['custom', *MODEL_PRESETS]}", file=sys.stderr)
        return 2
    if args.quick:
        shapes, token_counts = [(512, 512), (512, 1376)], [int(t) for t in (args.tokens or "256").split(",")]
        args.repeats, args.warmup = min(args.repeats, 2), 1
        args.hidden, args.layers, args.batch, args.seq, args.vocab = 256, 1, 1, 64, 256
        models = ["custom"]
        names = [n for n in names if gpu or n not in QUICK_SKIP]
    env = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": args.clock,
           "timer": "cuda events" if device.type == "cuda" else f"{args.clock} clock",
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "preset": args.preset,
           "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
           "argv": sys.argv[1:] if argv is None else argv}
    plan = []
    for suite in args.suites.split(","):
        if suite == "linear":
            plan += [("linear", (n, m, t)) for n, m in shapes for t in token_counts]
        elif suite == "model":
            plan += [("model", model_spec(name, args)) for name in models]
        else:
            print(f"error: unknown suite {suite!r}; use linear and/or model", file=sys.stderr)
            return 2
    suites, skipped = [], []
    t0 = time.perf_counter()
    for kind, what in plan:
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            skipped.append(f"{kind} {what if kind == 'linear' else what['name']}")
            continue
        result = linear_suite(*what, names, args, device, dtype) if kind == "linear" else \
            model_suite(names, what, args, device, dtype)
        suites.append({**result, "clock": args.clock})
        print(format_suite(suites[-1]) + "\n", flush=True)
        _write_json(args.json_out, {"env": {**env, "wall_s": round(time.perf_counter() - t0, 1)}, "suites": suites})
    env.update(wall_s=round(time.perf_counter() - t0, 1), skipped_suites=skipped)
    if gpu:
        print(format_summary(suites, names) + "\n")
    print(f"env: {env}")
    payload = {"env": env, "suites": suites}
    _write_json(args.json_out, payload)
    if args.json:
        print(json.dumps(payload))
    return 1 if any(s["errors"] for s in suites) else 0


if __name__ == "__main__":
    sys.exit(main())
