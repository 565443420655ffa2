"""Input dropout on CPU: ``nn.Dropout`` against ``malora.layers.dropout.InputDropout``, side by side in one process.

    python benchmarks/probes/dropout_speed.py --threads 1 --json

For each (T, n) shape (SmolLM2's 800 x 576 and 800 x 1536 adapter inputs, the 4096-wide one of
``adapter_speed.py``) and p: the forward alone and forward + backward (upstream gradient fixed, x requires
grad), median CPU time of ``--repeats`` interleaved rounds (``adapter_speed.run_interleaved``: the order
rotated every round), and the bytes each keeps for backward (a float mask for ``nn.Dropout``, the int64
drop positions for ours).
``--json``: the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from malora.layers.dropout import InputDropout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)
from adapter_speed import run_interleaved  # noqa: E402  (the interleaved, rotating-order timer)

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


def repeated(fn: Callable[[], None], inner: int) -> Callable[[], None]:
    """``fn`` called ``inner`` times: one timed sample (divided by ``inner`` afterwards)."""
    def run() -> None:
        for _ in range(inner):
            fn()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--p", type=float, nargs="+", default=[0.05, 0.1])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=5, help="calls per timed sample")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, ratios = [], {}
    for prob in args.p:
        variants = {"nn.Dropout": nn.Dropout(prob).train(), "InputDropout": InputDropout(prob).train()}
        for shape in SHAPES:
            x = torch.randn(shape, requires_grad=True)
            g = torch.randn(shape)
            steps = {}
            for name, mod in variants.items():
                def fwd(mod=mod):
                    with torch.no_grad():
                        mod(x)

                def fwd_bwd(mod=mod):
                    mod(x).backward(g)
                    x.grad = None
                steps[f"{name} fwd"] = repeated(fwd, args.inner)
                steps[f"{name} fwd_bwd"] = repeated(fwd_bwd, args.inner)
            times = run_interleaved(steps, args.repeats, 1, torch.device("cpu"), clock="cpu")
            stock, ours = ({"p": prob, "shape": list(shape), "variant": name,
                            "fwd_ms": statistics.median(times[f"{name} fwd"]) / args.inner,
                            "fwd_bwd_ms": statistics.median(times[f"{name} fwd_bwd"]) / args.inner,
                            "saved_mib": saved_bytes(mod, x) / 2**20} for name, mod in variants.items())
            rows += [stock, ours]
            ratios[f"p={prob} {shape[0]}x{shape[1]}"] = {
                "fwd": stock["fwd_ms"] / ours["fwd_ms"], "fwd_bwd": stock["fwd_bwd_ms"] / ours["fwd_bwd_ms"],
                "saved": stock["saved_mib"] / max(ours["saved_mib"], 1e-12)}
    print("| p | shape | variant | forward ms | forward + backward ms | saved for backward MiB |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['p']} | {r['shape'][0]}x{r['shape'][1]} | {r['variant']} | {r['fwd_ms']:.2f} | "
              f"{r['fwd_bwd_ms']:.2f} | {r['saved_mib']:.2f} |")
    for key, r in ratios.items():
        print(f"{key}: nn.Dropout / ours  forward {r['fwd']:.2f}x  forward+backward {r['fwd_bwd']:.2f}x  "
              f"saved memory {r['saved']:.1f}x")
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "threads": args.threads, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
