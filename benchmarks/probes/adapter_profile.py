"""Where an adapter layer's forward + backward time goes, op by op (torch.profiler), beside the frozen layer.

    python benchmarks/probes/adapter_profile.py --n 4096 --m 4096 --tokens 1024 --variants frozen,lora_r64,malora
    python benchmarks/probes/adapter_profile.py --n 576 --m 1536 --tokens 800          # a SmolLM2-135M MLP input

Each variant of ``benchmarks/adapter_speed.py`` (same builders: input dropout 0.05, random adapter weights) runs
``--warmup`` steps, then ``--steps`` profiled steps on one thread; the table lists self CPU time per step of every
(op, input shapes) pair above ``--min-ms``, and splits the total into the frozen layer's two GEMMs (forward
``x W^T`` and backward ``dy W``), the adapter's GEMMs and everything else (elementwise passes, dropout masks,
routing). Absolute times move with the machine's load; the split and the op list are what this is for.
``--json``: the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)
import adapter_speed  # noqa: E402  (the variant builders)


def profile_variant(name: str, n: int, m: int, tokens: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False).requires_grad_(False)
    x = torch.randn(tokens, n, requires_grad=True)
    grad = torch.randn(tokens, m)
    module = adapter_speed.build_linear_variant(name, base).train()

    def step() -> None:
        module(x).backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    ops = [{"op": e.key, "shapes": str(e.input_shapes), "ms": e.self_cpu_time_total / 1e3 / steps,
            "calls": e.count // steps} for e in prof.key_averages(group_by_input_shape=True)]
    frozen_shapes = {str([[tokens, n], [n, m]]), str([[tokens, m], [m, n]])}
    frozen = sum(o["ms"] for o in ops if o["op"] == "aten::mm" and o["shapes"] in frozen_shapes)
    adapter_mm = sum(o["ms"] for o in ops if o["op"] == "aten::mm") - frozen
    total = sum(o["ms"] for o in ops)
    return {"variant": name, "total_ms": total, "frozen_mm_ms": frozen, "adapter_mm_ms": adapter_mm,
            "other_ms": total - frozen - adapter_mm, "ops": sorted(ops, key=lambda o: -o["ms"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="in_features")
    p.add_argument("--m", type=int, default=4096, help="out_features")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--variants", default="frozen,lora_r64,malora")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-ms", type=float, default=0.5, help="hide ops below this self time per step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(adapter_speed.VARIANTS))
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {list(adapter_speed.VARIANTS)}", file=sys.stderr)
        return 2
    results = [profile_variant(v, args.n, args.m, args.tokens, args.steps, args.warmup) for v in names]
    for r in results:
        print(f"== {r['variant']} ({args.n}->{args.m}, {args.tokens} tokens): {r['total_ms']:.1f} ms/step = frozen "
              f"GEMMs {r['frozen_mm_ms']:.1f} + adapter GEMMs {r['adapter_mm_ms']:.1f} + other {r['other_ms']:.1f}")
        for o in r["ops"]:
            if o["ms"] >= args.min_ms:
                print(f"   {o['op'][:28]:28s} {o['shapes'][:64]:64s} {o['ms']:8.2f} ms  x{o['calls']}")
    if args.json:
        print(json.dumps({"shape": {"n": args.n, "m": args.m, "tokens": args.tokens}, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
