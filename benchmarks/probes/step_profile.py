"""Where one training step of our loop spends its time, by kind of op (torch.profiler), on the study's batches.

    python benchmarks/probes/step_profile.py --variants lora_r64,malora --steps 2 --json
    python benchmarks/probes/step_profile.py --variants ours --fp32                       # LoRA r16, bf16 and fp32
    python benchmarks/probes/step_profile.py --variants lora_r64,malora --compile         # compiled decoder blocks

Each variant of ``benchmarks/_harness.py`` (its adapters, its loop: ``worker.train_step``) trains on the
study's cloze batches (``search_spaces/intra_domain_cpu.yaml``, ``--batch`` rows, batches whose longest row has
40-90 tokens, the bulk of the stream) with the base held in bf16 (``--fp32``: also the float32 base), one thread:
one warm-up step, then ``--steps`` profiled steps. Self CPU time is summed into kinds of op (:data:`KINDS`); the
``--rows`` slowest (op, input shapes) pairs are printed below. Absolute times move with the machine's load; the
shares are what this is for.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

ROOT = h.ROOT
KINDS = {  # kind -> aten ops whose self time it sums; everything else is "other"
    "GEMM": ("aten::mm", "aten::addmm_", "aten::addmm", "aten::bmm"),
    "attention (SDPA forward and backward)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "dtype casts and copies": ("aten::copy_",),
    "elementwise": ("aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::sub", "aten::div", "aten::neg",
                    "aten::pow", "aten::rsqrt", "aten::mean", "aten::sum", "aten::silu", "aten::silu_backward",
                    "aten::fill_", "aten::cat", "aten::where", "aten::lerp_", "aten::addcdiv_", "aten::addcmul_",
                    "aten::sqrt"),
    "input dropout": ("aten::index_fill_", "aten::uniform_"),
    "head log-softmax (fp32)": ("aten::_log_softmax", "aten::_log_softmax_backward_data"),
    "routing": ("aten::_softmax", "aten::_softmax_backward_data", "aten::topk", "aten::scatter",
                "aten::scatter_add_", "aten::scatter_add", "aten::gather"),
}


def kind_of(op: str) -> str:
    return next((k for k, ops in KINDS.items() if op in ops), "other")


def profile_variant(name: str, base, tokenizer, spec, plan, encoded, precision, steps: int, rows: int,
                    compiled: bool = False) -> dict:
    runner = h.LoopRunner(name, base, tokenizer, spec, plan, encoded, h.Clock("cpu"), adapter=name,
                           precision=precision)
    if compiled:
        from malora.compile import compile_blocks

        compile_blocks(runner.trial.model)
    runner.run(2 if compiled else 1, 0)                                 # warm-up: allocations, kernels, compilation
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        runner.run(steps, 1)
    events = prof.key_averages(group_by_input_shape=True)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total / 1e3         # ms
    total = sum(by_kind.values())
    timed = [r for r in runner.records if r["round"] == 1]
    slowest = sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]
    return {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["clock_s"] for r in timed),
            "step_s": [r["clock_s"] for r in timed], "total_ms": total,
            "share": {k: v / total for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "slowest": [{"op": e.key, "shapes": str(e.input_shapes), "calls": e.count,
                         "ms": e.self_cpu_time_total / 1e3} for e in slowest]}


def main(argv: list[str] | None = None) -> int:
    from orchestrator.data.batching import epoch_batches
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import Precision, keep_freed_memory

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="lora_r64,malora", help=f"of {sorted(h.ADAPTERS)}")
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "intra_domain_cpu.yaml"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--fp32", action="store_true", help="also profile each variant on the float32 base")
    p.add_argument("--compile", action="store_true", help="decoder blocks through malora.compile.compile_blocks")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    keep_freed_memory()                                                 # as the worker does
    data = types.SimpleNamespace(space=args.space, model="smollm2-135m-instruct", batch_size=args.batch,
                                 train_limit=400, max_length=256)
    spec, base, tokenizer, encoded = h.load_data(data)
    base_bf16 = load_model(data.model, dtype="bfloat16")[0]
    lengths = [len(e["input_ids"]) for e in encoded]
    plan = [b for b in epoch_batches(lengths, args.batch, 0, 1, spec.train.seed, 0, True)
            if 40 <= max(lengths[i] for i in b) <= 90][: args.steps + 2]
    held = Precision("bf16", "benchmark", "bfloat16")
    result = {}
    for name in args.variants.split(","):
        runs = [("bf16", base_bf16, held)] + ([("fp32", base, None)] if args.fp32 else [])
        for label, weights, precision in runs:
            r = profile_variant(name, weights, tokenizer, spec, plan, encoded, precision, args.steps, args.rows,
                                args.compile)
            result[f"{name} {label}"] = r
            print(f"== {name} {label}: {r['tokens_per_s']:.1f} tokens/s, steps "
                  + ", ".join(f"{s:.2f}" for s in r["step_s"]) + " s")
            for k, v in r["share"].items():
                print(f"   {k:40s} {100 * v:5.1f} %")
            for e in r["slowest"]:
                print(f"   {e['ms']:8.1f} ms {e['calls']:5d} x {e['op']:28.28s} {e['shapes'][:90]}")
    if args.json:
        from orchestrator.models.hardware import cpu_info
        print(json.dumps({"cpu": cpu_info(), "torch": torch.__version__, "batch": args.batch, "variants": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
