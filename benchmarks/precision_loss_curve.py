"""Training loss per step of one trial in fp32, bf16 (base held in bfloat16) and bf16 autocast (base float32), on
identical batches (issue 19).

    python benchmarks/precision_loss_curve.py --steps 40 --json           # SmolLM2-135M, LoRA r16, ~5 min
    python benchmarks/precision_loss_curve.py --quick                    # tiny-llama, seconds

Both runs step ``orchestrator.training.worker.train_step`` (AdamW, warm-up + cosine over ``--steps``, clipping)
through ``train_throughput.LoopRunner`` with the same seed, adapter initialisation and length-grouped batches of
the intra-domain mix (``--adapter``: a variant of ``train_throughput.ADAPTERS``), one step of each in turn. The
table gives every ``--every``-th step's loss; the JSON line holds all of them and the largest relative gap, both
per step and over a sliding mean of ``--window`` steps (the per-step loss of a batch of 8 is noisy; the gap that
matters is the trend's).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import _harness as h  # this checkout's packages first on sys.path; the training harness


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--space", default=str(h.ROOT / "search_spaces" / "intra_domain.yaml"))
    p.add_argument("--adapter", default="ours", choices=sorted(h.ADAPTERS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--train-limit", type=int, default=400)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.train_limit, args.every, args.window = "tiny-llama", 8, 50, 2, 4
    torch.set_num_threads(args.threads)
    from orchestrator.data.batching import epoch_batches
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import Precision, keep_freed_memory

    keep_freed_memory()
    spec, base, tokenizer, encoded = h.load_data(args)
    bases = {"fp32": (base, None), "bf16": (load_model(args.model, dtype="bfloat16")[0],
                                            Precision("bf16", "benchmark", "bfloat16")),
             "bf16_autocast": (base, Precision("bf16", "benchmark", "float32"))}
    lengths = [len(e["input_ids"]) for e in encoded]
    plan = epoch_batches(lengths, args.batch_size, 0, 1, spec.train.seed, 0, True)[:args.steps]
    clock = h.Clock("cpu")
    runners = {name: h.LoopRunner(f"{args.adapter}", b, tokenizer, spec, plan, encoded, clock, precision=prec)
               for name, (b, prec) in bases.items()}
    losses: dict[str, list[float]] = {name: [] for name in runners}
    for step in range(args.steps):
        for name, runner in runners.items():
            before = runner.window["loss"]
            runner.run(1, step)
            losses[name].append(runner.window["loss"] - before)
    w = args.window
    smooth = {n: [sum(v[i:i + w]) / w for i in range(len(v) - w + 1)] for n, v in losses.items()}
    gaps = {n: {"per_step": max(abs(b - f) / f for b, f in zip(losses[n], losses["fp32"])),
                "smoothed": max((abs(b - f) / f for b, f in zip(smooth[n], smooth["fp32"])), default=0.0)}
            for n in ("bf16", "bf16_autocast")}
    print(f"| step | fp32 loss | bf16 (held) | bf16 autocast |   ({args.model}, {args.adapter}, batch {args.batch_size})")
    print("|---:|---:|---:|---:|")
    for i in range(0, args.steps, args.every):
        print(f"| {i + 1} | {losses['fp32'][i]:.4f} | {losses['bf16'][i]:.4f} | {losses['bf16_autocast'][i]:.4f} |")
    for n, g in gaps.items():
        print(f"{n}: largest relative gap to fp32 per step {g['per_step']:.2%}, over {w}-step means "
              f"{g['smoothed']:.2%}; mean of the last {w} steps {smooth[n][-1]:.4f} (fp32 {smooth['fp32'][-1]:.4f})")
    if args.json:
        print(json.dumps({"losses": losses, "gaps": gaps, "window": w,
                          "config": {k: v for k, v in vars(args).items() if k != "json"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
