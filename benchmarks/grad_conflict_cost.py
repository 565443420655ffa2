"""Cost of the gradient-conflict diagnostic against a trial's training (issue 31: within 5 % of a trial's time).

    python benchmarks/grad_conflict_cost.py --space search_spaces/intra_domain_cpu.yaml --methods malora molora
    python benchmarks/grad_conflict_cost.py --space search_spaces/smoke.yaml --methods malora --steps 2   # seconds

Per method (the space's fixed configuration, ``orchestrator.tuning.study.fixed_configs``), in one process with
``resources.cpus_per_worker`` threads as a trial has: ``--warmup`` training steps, then ``--steps`` timed steps
of ``orchestrator.training.worker.train_step`` (the trial's own step: its batches, loss and optimizer), then
the probe (``eval.probe_items`` train items per task, ``orchestrator.training.diagnostics.trial_probe``) and
one warm-up and ``--rounds`` timed calls of ``conflict_diagnostics`` (one forward and backward per task).

The share is an upper bound of the diagnostic's part of a trial: ``evaluations x diagnostic / (max_steps x
step)``, with evaluations = ceil(max_steps / every_n_steps); the trial's time also holds setup and scoring,
which the denominator leaves out. It is given at the space's ``eval.every_n_steps`` and at the default, 50.
Clocks: wall and the process CPU time (with one thread the ops' own cost, even when other jobs share the cores).
``--json``: the last line of output is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_EVERY = 50


def timed(fn, rounds: int) -> tuple[float, float]:
    """(median wall s, median process-CPU s) of ``rounds`` calls of ``fn``."""
    wall, cpu = [], []
    for _ in range(rounds):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def measure(spec, method: str, config: dict, args) -> dict:
    from orchestrator.data.suites import load_pools
    from orchestrator.evaluation.grad_conflict import conflict_diagnostics
    from orchestrator.training import worker
    from orchestrator.training.diagnostics import trial_probe
    from orchestrator.training.loss import ResponseLoss

    device = torch.device("cpu")
    trial = worker.build_trial_model(spec, config, device)
    encoded, _, _ = worker.build_training_data(spec, trial.tokenizer)
    steps = worker.total_steps(spec, len(encoded), 1)
    optim = worker.build_optimisation(trial, spec, steps)
    session = worker.LocalSession()
    loss = worker.training_loss(trial.model)
    stream = worker.resume_stream(encoded, spec, session, trial.tokenizer, 0)
    step = iter(range(10**9))

    def one_step():
        worker.train_step(loss, trial, optim, stream, spec, 1, next(step), worker.new_window(), device)

    timed(one_step, args.warmup)
    step_wall, step_cpu = timed(one_step, args.steps)
    probe = trial_probe(spec, trial, load_pools(spec).train)

    def diagnostic():
        conflict_diagnostics(trial.model, probe, device, lambda m, b: ResponseLoss(m)(**b))

    timed(diagnostic, 1)
    diag_wall, diag_cpu = timed(diagnostic, args.rounds)
    row = {"method": method, "max_steps": steps, "batch_size": spec.train.batch_size,
           "probe_rows": sum(len(k) for k in probe.keys.values()), "tasks": len(probe.keys),
           "step_wall_s": step_wall, "step_cpu_s": step_cpu, "diag_wall_s": diag_wall, "diag_cpu_s": diag_cpu}
    for label, every in (("space", spec.eval.every_n_steps), ("default", DEFAULT_EVERY)):
        evaluations = math.ceil(steps / every)
        row[f"share_{label}"] = evaluations * diag_cpu / (steps * step_cpu)
        row[f"every_{label}"] = every
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "intra_domain_cpu.yaml"))
    parser.add_argument("--methods", nargs="+", default=["malora", "molora"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from orchestrator.spec.space import load_space
    from orchestrator.tuning.study import fixed_configs

    spec = load_space(args.space)
    spec = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, grad_conflict=True))
    configs = fixed_configs(spec)
    rows = [measure(spec, m, configs[m], args) for m in args.methods]
    print(f"{'method':8} {'step s':>8} {'diag s':>8} {'probe':>6}  share at every_n_steps")
    for r in rows:
        print(f"{r['method']:8} {r['step_cpu_s']:8.2f} {r['diag_cpu_s']:8.2f} {r['probe_rows']:6d}  "
              f"{100 * r['share_space']:.2f} % at {r['every_space']}, {100 * r['share_default']:.2f} % at "
              f"{r['every_default']} (CPU clock; wall: step {r['step_wall_s']:.2f} s, diag {r['diag_wall_s']:.2f} s)")
    if args.json:
        print(json.dumps({"space": args.space, "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
