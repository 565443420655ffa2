"""Low-rank deltas added by one GEMM into the frozen output (``addmm_``) against a fresh (T, m) delta plus an add.

    python benchmarks/probes/lowrank_accumulate.py --methods lora molora malora mosld --steps 3 --rounds 2 --json

``AdapterLayer.forward`` adds a LoRA, HydraLoRA or dense-mixture delta ``h up^T`` to the frozen output ``y`` as
``y.addmm_(h, up^T)`` (:func:`malora.layers.base.add_delta_`, BLAS beta = 1). Before, the up-projection wrote a
fresh (T, m) tensor and ``y.add_`` read both back: two passes over (T, m) that are memory-bound, and on a bf16 AMX
core, right after the frozen GEMM, slower than that GEMM. Two measurements, one thread, one process:

1. the products at SmolLM2's MLP-up shape (T x 576 -> 1536, R = 16 / 64 / 96): the frozen GEMM alone, the
   up-projection + add, and the up-projection as ``addmm_`` into the frozen output, fp32 and bf16;
2. training tokens/s of the study's methods (``search_spaces/intra_domain_cpu.yaml``: its model, batches,
   precision) with the two-pass add and with ``addmm_``, in alternating rounds on the same batches; the best
   round of each is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # probes/: dispatch_threshold

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import malora.layers.base as layer_base  # noqa: E402
from dispatch_threshold import alternating_tokens_per_s  # noqa: E402
from orchestrator.models.hardware import cpu_info  # noqa: E402
from orchestrator.spec.space import load_space  # noqa: E402

ONE_GEMM = layer_base.add_delta_


def two_passes(y: torch.Tensor, delta) -> torch.Tensor:
    """The add before this change: the delta materialised as a (T, m) tensor, then added to y."""
    return y.add_(layer_base.materialise(delta).to(y.dtype))


def products(tokens: int, n: int, m: int, ranks: list[int], reps: int) -> dict:
    """Milliseconds (process CPU clock, median of ``reps``) of the frozen GEMM and both ways of adding h up^T.

    Each way starts from a frozen output just written by the GEMM, as in the layer (that output is not in cache).
    """
    def clocked(fn, *args) -> float:
        start = time.process_time()
        fn(*args)
        return time.process_time() - start

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, W = torch.randn(tokens, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
        for r in ranks:
            h, up = torch.randn(tokens, r, dtype=dtype), torch.randn(m, r, dtype=dtype)
            t: dict[str, list[float]] = {"frozen": [], "up_then_add": [], "addmm_into_y": []}
            for _ in range(reps + 2):
                t["frozen"].append(clocked(F.linear, x, W))
                t["up_then_add"].append(clocked(lambda y, h, up: y.add_(F.linear(h, up)), F.linear(x, W), h, up))
                t["addmm_into_y"].append(clocked(lambda y, h, up: y.addmm_(h, up.T), F.linear(x, W), h, up))
            name = f"{str(dtype).split('.')[-1]} R={r}"
            out[name] = {k: 1e3 * sorted(v[2:])[len(v[2:]) // 2] for k, v in t.items()}
    return out


def tokens_per_s(method: str, spec, steps: int, rounds: int) -> dict[str, float]:
    settings = {name: (lambda add=add: setattr(layer_base, "add_delta_", add))
                for name, add in (("two_passes", two_passes), ("one_gemm", ONE_GEMM))}
    return alternating_tokens_per_s(method, spec, settings, steps, rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="search_spaces/intra_domain_cpu.yaml")
    p.add_argument("--methods", nargs="+", default=["lora", "molora", "malora", "mosld"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=1600, help="rows of the product benchmark (the study's 32 x ~50)")
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 96])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    prods = products(args.tokens, 576, 1536, args.ranks, reps=15)
    for k, v in prods.items():
        print(f"{k:12s} frozen GEMM {v['frozen']:6.2f} ms   up + add {v['up_then_add']:6.2f} ms   "
              f"addmm_ into y {v['addmm_into_y']:6.2f} ms   ({v['up_then_add'] / v['addmm_into_y']:.1f}x)")
    spec = load_space(args.space)
    try:
        rates = {m: tokens_per_s(m, spec, args.steps, args.rounds) for m in args.methods}
    finally:
        layer_base.add_delta_ = ONE_GEMM
    for m, r in rates.items():
        print(f"{m:8s} two passes {r['two_passes']:6.0f} tokens/s   one GEMM {r['one_gemm']:6.0f} tokens/s   "
              f"({r['one_gemm'] / r['two_passes']:.2f}x)")
    if args.json:
        print(json.dumps({"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "products_ms": prods, "tokens_per_s": rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
