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
}
# malora_dense = "malora" whenever auto picks dense (it does at the default shapes); *_p0 are diagnostics
DEFAULT_SKIP = ("malora_dense", "malora_p0", "proto_malora_p0")
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


def _randomise_adapters(module: nn.Module) -> None:
    """Nonzero B (and routers that do not all agree), so no path can skip work on zeros."""
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


def run_interleaved(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                    device: torch.device, clock: str = "wall") -> dict[str, list[float]]:
    """Time every step ``repeats`` times (after ``warmup`` rounds), round-robin with a rotating start.

    ``clock="wall"``: elapsed time (CUDA synchronised). ``clock="cpu"``: this process's CPU time
    (``time.process_time``), which does not count time the process spends descheduled by other jobs.
    """
    now = time.process_time if clock == "cpu" else time.perf_counter
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for n in order:
            _sync(device)
            t0 = now()
            steps[n]()
            _sync(device)
            if rnd >= warmup:
                times[n].append((now() - t0) * 1e3)
    return times


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

    steps = {name: make_step(mod) for name, mod in modules.items()}
    times = run_interleaved(steps, args.repeats, args.warmup, device, args.clock)
    pre = [x, grad] + [t for mod in modules.values() for t in [*mod.parameters(), *mod.buffers()]]
    peaks = {name: measure_peak_mb(steps[name], pre, device) for name in names}
    dispatch = {name: mod.resolve_dispatch(tokens) for name, mod in modules.items()
                if hasattr(mod, "resolve_dispatch")}
    return _summarise(f"linear {n}->{m}", {"tokens": tokens, "n": n, "m": m}, times, peaks, dispatch)


def model_suite(names: list[str], args, device, dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, vocab_size=args.vocab,
                      max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    base_model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
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

    steps = {name: make_step(model) for name, model in models.items()}
    times = run_interleaved(steps, args.repeats, args.warmup, device, args.clock)
    pre = [ids, embeds] + [t for model in models.values() for t in [*model.parameters(), *model.buffers()]]
    peaks = {name: measure_peak_mb(steps[name], pre, device) for name in names}
    shape = {"hidden": args.hidden, "layers": args.layers, "batch": args.batch, "seq": args.seq,
             "tokens": args.batch * args.seq, "vocab": args.vocab}
    return _summarise(f"LLaMA-style model h={args.hidden} L={args.layers}", shape, times, peaks, {})


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
        runs = " ".join(f"{t:.0f}" for t in v["ms_all"])
        lines.append(f"| {name} | {v['ms']:.1f} | {rel} | {v['peak_mb']:.1f} | {runs} |")
    if s["auto_dispatch"]:
        lines.append(f"dispatch chosen by auto: {s['auto_dispatch']}; fastest MoLoRA: {s['molora_fastest']}")
    lines += ["", "| target | ratio | bound | ok |", "|---|---:|---:|:-:|"]
    for r in s["ratios"]:
        lines.append(f"| {r['target']} (vs {r['vs']}) | {r['value']:.3f} | {r['bound']:.2f} | "
                     f"{'✓' if r['ok'] else '✗'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Adapter forward+backward speed and peak memory.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--tokens", type=int, default=None, help="tokens for the linear suite (cpu 1024, cuda 16384)")
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
    p.add_argument("--json", action="store_true", help="end with one JSON line holding every number")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.clock is None:
        args.clock = "cpu" if device.type == "cpu" else "wall"
    if args.clock == "cpu" and device.type == "cuda":
        print("error: --clock cpu cannot time CUDA kernels; use --clock wall", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    names = args.variants.split(",") if args.variants else [n for n in VARIANTS if n not in DEFAULT_SKIP]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    shapes = [(4096, 4096), (4096, 11008)]
    tokens = args.tokens or (16384 if device.type == "cuda" else 1024)
    if args.quick:
        shapes, tokens = [(512, 512), (512, 1376)], args.tokens or 256
        args.repeats, args.warmup = min(args.repeats, 2), 1
        args.hidden, args.layers, args.batch, args.seq, args.vocab = 256, 1, 1, 64, 256
        names = [n for n in names if n not in QUICK_SKIP]
    suites = []
    t0 = time.perf_counter()
    for suite in args.suites.split(","):
        if suite == "linear":
            for n, m in shapes:
                suites.append({**linear_suite(n, m, tokens, names, args, device, dtype), "clock": args.clock})
                print(format_suite(suites[-1]) + "\n", flush=True)
        elif suite == "model":
            suites.append({**model_suite(names, args, device, dtype), "clock": args.clock})
            print(format_suite(suites[-1]) + "\n", flush=True)
        else:
            print(f"error: unknown suite {suite!r}; use linear and/or model", file=sys.stderr)
            return 2
    env = {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": args.clock,
           "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
           "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick,
           "wall_s": round(time.perf_counter() - t0, 1), "argv": sys.argv[1:] if argv is None else argv}
    print(f"env: {env}")
    if args.json:
        print(json.dumps({"env": env, "suites": suites}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
