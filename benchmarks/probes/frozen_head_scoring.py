"""Scoring time per item of a trained (frozen-base) model: the head on 2-D rows against HF's ``logits_to_keep=1``.

    python benchmarks/probes/frozen_head_scoring.py --method molora --task obqa --items 32 --rounds 2

A study scores every trained run on val and test with the base frozen. HF's ``logits_to_keep=1`` hands the head
the 3-D slice ``h[:, -1:, :]``; under ``no_grad`` with a frozen head ``torch.matmul`` cannot fold it into one GEMM
and broadcasts the (V, H) head to (B, H, V) before a ``bmm``. ``scoring._last_position_logits`` runs the head on
``h[:, -1, :]`` (2-D) instead. Both paths are timed here in alternating rounds in one process, on the study's
model, data and precision (``search_spaces/intra_domain_cpu.yaml``), and their chosen options are compared.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)

import torch  # noqa: E402

from orchestrator.evaluation import scoring  # noqa: E402
from orchestrator.models.hardware import cpu_info  # noqa: E402
from orchestrator.spec.space import load_space  # noqa: E402
from orchestrator.training import worker  # noqa: E402


def hf_keep_one(model, parts, kwargs):
    """The earlier path: HF's own head call on the (B, 1, H) slice."""
    out = model(**kwargs, logits_to_keep=1)
    return out, out.logits[:, -1, :]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="search_spaces/intra_domain_cpu.yaml")
    p.add_argument("--method", default="molora")
    p.add_argument("--task", default="obqa")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    spec = load_space(args.space)
    device = torch.device("cpu")
    trial = worker.build_trial_model(spec, {"method": args.method}, device)
    torch.set_num_threads(1)
    _, pools, _ = worker.build_training_data(spec, trial.tokenizer)
    items = pools["val"][args.task][:args.items]
    paths = {"hf_logits_to_keep": hf_keep_one, "head_on_rows": scoring._last_position_logits}
    times: dict[str, list[float]] = {name: [] for name in paths}
    chosen: dict[str, list] = {}
    try:
        with trial.eval_precision.context(device.type):
            worker.evaluate_sharded(trial.model, trial.tokenizer, {args.task: items[:2]}, spec, 0, 1, device)
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    scoring._last_position_logits = fn
                    t = time.perf_counter()
                    _, _, per = worker.evaluate_sharded(trial.model, trial.tokenizer, {args.task: items}, spec,
                                                        0, 1, device)
                    times[name].append((time.perf_counter() - t) / len(items))
                    chosen[name] = per[args.task]["chosen"]
    finally:
        scoring._last_position_logits = paths["head_on_rows"]
    best = {name: min(v) for name, v in times.items()}
    result = {"cpu": cpu_info(), "torch": torch.__version__, "method": args.method, "task": args.task,
              "items": len(items), "precision": trial.eval_precision.name, "s_per_item": best,
              "speedup": best["hf_logits_to_keep"] / best["head_on_rows"],
              "same_chosen": chosen["hf_logits_to_keep"] == chosen["head_on_rows"]}
    for name, v in best.items():
        print(f"{name:18s} {v:.3f} s/item (best of {args.rounds})")
    print(f"speed-up {result['speedup']:.2f}x; same chosen options: {result['same_chosen']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
