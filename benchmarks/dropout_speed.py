"""Input dropout on CPU: ``nn.Dropout`` against ``malora.layers.dropout.InputDropout``, side by side in one process.

    python benchmarks/dropout_speed.py --threads 1 --json

For each (T, n) shape (SmolLM2's 800 x 576 and 800 x 1536 adapter inputs, the 4096-wide one of
``adapter_speed.py``) and p: the forward alone and forward + backward (upstream gradient fixed, x requires
grad), median CPU time of ``--repeats`` interleaved rounds (each round times both variants, order alternating),
and the bytes each keeps for backward (a float mask for ``nn.Dropout``, the int64 drop positions for ours).
``--json``: the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from malora.layers.dropout import InputDropout

SHAPES = ((800, 576), (800, 1536), (1024, 4096))


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward of ``module(x)`` (x itself excluded)."""
    seen: list[int] = []

    def pack(t: torch.Tensor):
        if t.data_ptr() != x.data_ptr():
            seen.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen)


def time_ms(fn, inner: int) -> float:
    t0 = time.process_time()
    for _ in range(inner):
        fn()
    return (time.process_time() - t0) / inner * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--p", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=5, help="calls per timed sample")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for prob in args.p:
        variants = {"nn.Dropout": nn.Dropout(prob).train(), "InputDropout": InputDropout(prob).train()}
        for shape in SHAPES:
            x = torch.randn(shape, requires_grad=True)
            g = torch.randn(shape)
            fns = {}
            for name, mod in variants.items():
                def fwd(mod=mod):
                    with torch.no_grad():
                        mod(x)

                def fwd_bwd(mod=mod):
                    mod(x).backward(g)
                    x.grad = None
                fns[name] = (fwd, fwd_bwd)
            times = {name: ([], []) for name in variants}
            for rnd in range(args.repeats + 1):
                order = list(variants) if rnd % 2 == 0 else list(reversed(variants))
                for name in order:
                    f, fb = fns[name]
                    a, b = time_ms(f, args.inner), time_ms(fb, args.inner)
                    if rnd:                                              # round 0 warms up
                        times[name][0].append(a)
                        times[name][1].append(b)
            for name, mod in variants.items():
                rows.append({"p": prob, "shape": list(shape), "variant": name,
                             "fwd_ms": statistics.median(times[name][0]),
                             "fwd_bwd_ms": statistics.median(times[name][1]),
                             "saved_mib": saved_bytes(mod, x) / 2**20})
    print("| p | shape | variant | forward ms | forward + backward ms | saved for backward MiB |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['p']} | {r['shape'][0]}x{r['shape'][1]} | {r['variant']} | {r['fwd_ms']:.2f} | "
              f"{r['fwd_bwd_ms']:.2f} | {r['saved_mib']:.2f} |")
    ratios = {}
    for prob in args.p:
        for shape in SHAPES:
            stock, ours = (next(r for r in rows if r["p"] == prob and r["shape"] == list(shape) and r["variant"] == v)
                           for v in variants)
            key = f"p={prob} {shape[0]}x{shape[1]}"
            ratios[key] = {"fwd": stock["fwd_ms"] / ours["fwd_ms"], "fwd_bwd": stock["fwd_bwd_ms"] / ours["fwd_bwd_ms"],
                           "saved": stock["saved_mib"] / max(ours["saved_mib"], 1e-12)}
            print(f"{key}: nn.Dropout / ours  forward {ratios[key]['fwd']:.2f}x  forward+backward "
                  f"{ratios[key]['fwd_bwd']:.2f}x  saved memory {ratios[key]['saved']:.1f}x")
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "threads": args.threads, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
