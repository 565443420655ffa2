"""Training tokens/s of the study's routed adapters under two dense/sparse thresholds of ``choose_dispatch``.

    python benchmarks/probes/dispatch_threshold.py --methods molora malora mosld --steps 3 --rounds 2 --json

``malora.layers.base.choose_dispatch`` runs every expert on every token ("dense") while all experts together cost
at most ``DENSE_MAX_COST_RATIO`` of the frozen matmul, else the sorted top-k dispatch ("sparse"). On SmolLM2 the
k/v projections (576 -> 192) put MoLoRA 8 x r8 at 0.44 of the frozen matmul: sparse under 1/4, dense under 1.
Each method trains the study's model on the same length-grouped batches (``search_spaces/intra_domain_cpu.yaml``,
one thread) with each threshold in alternating rounds in one process; the best round per threshold is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness, the measured scripts
import _harness as h  # noqa: E402,F401  (this checkout's packages first on sys.path)

import torch  # noqa: E402

import malora.layers.base as layer_base  # noqa: E402
from orchestrator.models.hardware import cpu_info  # noqa: E402
from orchestrator.spec.space import load_space  # noqa: E402
from orchestrator.training import worker  # noqa: E402


def alternating_tokens_per_s(method: str, spec, settings: dict, steps: int, rounds: int) -> dict:
    """Training tokens/s of ``method`` under each setting (name -> a function that applies it), the settings in
    alternating order over ``rounds`` on the same batches (one warm-up step each time); the best round of each."""
    session, device = worker.LocalSession(), torch.device("cpu")
    trial = worker.build_trial_model(spec, {"method": method}, device)
    encoded, _, _ = worker.build_training_data(spec, trial.tokenizer)
    optim = worker.build_optimisation(trial, spec, 10 * steps * rounds * len(settings))
    loss = session.prepare(worker.training_loss(trial.model))
    best: dict = {}
    for r in range(rounds):
        for name, apply in list(settings.items())[:: 1 if r % 2 == 0 else -1]:
            apply()
            stream = worker.resume_stream(encoded, spec, session, trial.tokenizer, 5)  # the same batches each time
            worker.train_step(loss, trial, optim, stream, spec, 1, 0, worker.new_window(device), device)  # warm-up
            window = worker.new_window(device)
            for step in range(steps):
                worker.train_step(loss, trial, optim, stream, spec, 1, step, window, device)
            best[name] = max(best.get(name, 0.0), window["tokens"] / window["time"])
    return best


def tokens_per_s(method: str, spec, ratios: list[float], steps: int, rounds: int) -> dict[float, float]:
    settings = {ratio: (lambda ratio=ratio: setattr(layer_base, "DENSE_MAX_COST_RATIO", ratio)) for ratio in ratios}
    return alternating_tokens_per_s(method, spec, settings, steps, rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default="search_spaces/intra_domain_cpu.yaml")
    p.add_argument("--methods", nargs="+", default=["molora", "malora", "mosld"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 1.0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    spec = load_space(args.space)
    saved = layer_base.DENSE_MAX_COST_RATIO
    try:
        rates = {m: tokens_per_s(m, spec, args.ratios, args.steps, args.rounds) for m in args.methods}
    finally:
        layer_base.DENSE_MAX_COST_RATIO = saved
    lo, hi = args.ratios[0], args.ratios[-1]
    for m, r in rates.items():
        print(f"{m:8s} " + "  ".join(f"ratio {k:g}: {v:6.0f} tokens/s" for k, v in r.items())
              + f"  ({r[hi] / r[lo]:.2f}x)")
    if args.json:
        print(json.dumps({"cpu": cpu_info(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "tokens_per_s": {m: {str(k): v for k, v in r.items()} for m, r in rates.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
