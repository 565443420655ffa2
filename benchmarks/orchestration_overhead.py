"""Orchestration overhead: a search's wall time vs the same trials trained bare, in one process, without Ray.

    python benchmarks/orchestration_overhead.py --max-steps 4            # short trials: the fixed cost
    python benchmarks/orchestration_overhead.py --max-steps 3000         # >= 60 s trials: the ratio

1. Runs ``python -m orchestrator.search`` (subprocess, fresh temp dir) on a copy of the space with ``--trials``
   trials, one at a time (max_concurrent_trials 1, no ASHA) so that wall times compare one-for-one.
2. Reads the trials' resolved configs back from Tune and runs exactly those trials with the same worker
   function (``orchestrator.training.worker.run_training``, LocalSession: no Ray, no DDP wrapper, no MLflow), after the
   same base-model reference evaluation, sequentially in this process.
3. Prints and (``--out``) writes JSON: search wall, bare wall, ratio, fixed cost per trial
   ``(search - bare) / trials``, and per trial Tune's ``time_total_s`` against the bare time.
Both sides use the same torch thread count (``resources.cpus_per_worker``).

    python benchmarks/orchestration_overhead.py --ddp-cost --method malora --max-steps 6

measures instead the DDP choice of ``orchestrator.training.worker``: the same worker loop in 2 gloo processes (no Ray),
``find_unused_parameters=False`` (ours: stacked experts always get a gradient tensor) against ``True`` (DDP's
generic fix for unused experts, one autograd-graph walk per step); prints the mean step time of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--space", default=str(ROOT / "search_spaces" / "smoke.yaml"))
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=None, help="default: max_steps // 2")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--concurrency", default="1", help="max_concurrent_trials of the search (1 = one-for-one "
                   "with the sequential bare run; 'auto' = what users get)")
    p.add_argument("--health-check-interval", default=None, help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the search")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    p.add_argument("--ddp-cost", action="store_true", help="measure find_unused_parameters False vs True instead")
    p.add_argument("--method", default="malora", help="--ddp-cost: which method of the space to train")
    p.add_argument("--repeats", type=int, default=2, help="--ddp-cost: alternated runs per setting")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    raw = yaml.safe_load(Path(args.space).read_text())
    raw.setdefault("data", {})["data_dir"] = _data_dir(raw, Path(args.space))
    raw.setdefault("train", {}).update(max_steps=args.max_steps, epochs=None)
    if args.batch_size:
        raw["train"]["batch_size"] = args.batch_size
    raw.setdefault("eval", {})["every_n_steps"] = args.eval_every or max(1, args.max_steps // 2)
    raw.setdefault("search", {}).update(num_trials=args.trials, asha={"enabled": False})
    raw.setdefault("resources", {})["max_concurrent_trials"] = (
        args.concurrency if args.concurrency == "auto" else int(args.concurrency))
    raw.pop("smoke_test", None)
    work = Path(tempfile.mkdtemp(prefix="malora-overhead-"))
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    if args.ddp_cost:  # steady-state step time only: evaluate 2 items per task, twice
        raw["eval"]["eval_limit"] = 2
        raw["data"]["train_limit"] = min(raw["data"].get("train_limit") or 256, 256)
        space.write_text(yaml.safe_dump(raw, sort_keys=False))
        return ddp_cost(space, args.method, args.out, args.repeats)
    env = dict(os.environ)
    if args.health_check_interval:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = args.health_check_interval

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "orchestrator.search", "--space", str(space)], cwd=work, env=env,
                          capture_output=True, text=True)
    search_s = time.perf_counter() - t0
    (work / "search.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return 1
    exp = work / "ray_results" / raw.get("name", "search")
    trials = []
    for d in sorted(exp.glob("trial_*")):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        trials.append({"trial_id": d.name[6:], "config": json.loads((d / "params.json").read_text()),
                       "tune_time_total_s": rows[-1]["time_total_s"], "setup_s": rows[-1].get("setup_s"),
                       "tune_step_time_s": rows[-1].get("step_time_s")})

    from orchestrator.spec.space import load_space
    from orchestrator.training.worker import LocalSession, base_accuracy, run_training

    spec = load_space(space)
    t0 = time.perf_counter()
    reference = base_accuracy(spec)
    ref_s = time.perf_counter() - t0
    for t in trials:
        t1 = time.perf_counter()
        reports = run_training(spec, t["config"], LocalSession(), reference=reference, trial_id=t["trial_id"])
        t["bare_s"] = time.perf_counter() - t1
        t["bare_step_time_s"] = reports[-1]["step_time_s"]
    bare_s = time.perf_counter() - t0
    n = len(trials)
    result = {
        "space": args.space, "trials": n, "max_steps": args.max_steps, "concurrency": args.concurrency,
        "search_wall_s": round(search_s, 2),
        "bare_wall_s": round(bare_s, 2), "ratio": round(search_s / bare_s, 3),
        "fixed_cost_per_trial_s": round((search_s - bare_s) / n, 2), "bare_reference_s": round(ref_s, 2),
        "mean_bare_trial_s": round(sum(t["bare_s"] for t in trials) / n, 2),
        "mean_tune_trial_s": round(sum(t["tune_time_total_s"] for t in trials) / n, 2),
        "mean_per_trial_overhead_s": round(sum(t["tune_time_total_s"] - t["bare_s"] for t in trials) / n, 2),
        "health_check_interval_s": env.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25 (search default)"),
        "loadavg_1m": os.getloadavg()[0], "cpus": os.cpu_count(),
        "per_trial": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in t.items() if k != "config"}
                      for t in trials],
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


class _DDPSession:
    """run_training's session for a plain torch.distributed process (what Ray Train sets up, minus Ray)."""

    def __init__(self, rank: int, world: int, find_unused: bool, out: Path):
        self.rank, self.world_size, self.find_unused, self.out = rank, world, find_unused, out

    def device(self):
        import torch
        return torch.device("cpu")

    def checkpoint_dir(self):
        import contextlib
        return contextlib.nullcontext(None)

    def partial_store(self):  # no states between evaluations: the benchmark times the steps
        return None

    def prepare(self, model):
        from torch.nn.parallel import DistributedDataParallel

        from orchestrator.training.worker import no_buffer_sync
        return DistributedDataParallel(model, find_unused_parameters=self.find_unused, **no_buffer_sync())

    def report(self, metrics: dict, ckpt_dir: str | None) -> None:
        if self.rank == 0:
            with self.out.open("a") as f:
                f.write(json.dumps({"step": metrics["step"], "step_time_s": metrics["step_time_s"]}) + "\n")


def _ddp_worker(rank: int, world: int, space: str, config: dict, find_unused: bool, out: str, port: int) -> None:
    import torch.distributed as dist

    from orchestrator.spec.space import load_space
    from orchestrator.training.worker import run_training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_training(load_space(space), config, _DDPSession(rank, world, find_unused, Path(out)))
    finally:
        dist.destroy_process_group()


def ddp_cost(space: Path, method: str, out: str | None, repeats: int = 2) -> int:
    """Step time of a 2-rank DDP trial, find_unused_parameters False vs True, alternated ``repeats`` times
    (F T F T ...) so that drifting load on a shared machine hits both; per run the first report is skipped."""
    import socket
    import statistics

    import torch.multiprocessing as mp

    from orchestrator.spec.space import load_space

    spec = load_space(space)
    m = spec.method(method)
    config = {"method": method, **{f"{method}.{n}": (list(d.low) if isinstance(d.low, tuple) else d.low)
                                   for n, d in m.hparams}}  # each hyperparameter at its low end
    runs: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for find_unused in (False, True):
            log = space.parent / f"ddp_{find_unused}_{i}.jsonl"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_ddp_worker, args=(2, str(space), config, find_unused, str(log), port), nprocs=2, join=True)
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            later = rows[1:] or rows
            runs[find_unused].append(sum(r["step_time_s"] for r in later) / len(later))
    a, b = statistics.median(runs[False]), statistics.median(runs[True])
    result = {"method": method, "config": config, "max_steps": spec.train.max_steps, "repeats": repeats,
              "step_time_s_find_unused_False": [round(x, 4) for x in runs[False]],
              "step_time_s_find_unused_True": [round(x, 4) for x in runs[True]],
              "median_ratio_true_over_false": round(b / a, 3), "loadavg_1m": os.getloadavg()[0]}
    print(json.dumps(result, indent=1))
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    return 0


def _data_dir(raw: dict, space: Path) -> str:
    """The data folder as the search would resolve it, made absolute (the copy lives in a temp dir)."""
    from orchestrator.spec.space import resolve_data_dir

    path, problem = resolve_data_dir(raw.get("data", {}).get("data_dir", "${MALORA_DATA_DIR:-../shared/data}"),
                                     space.resolve().parent)
    if problem:
        raise SystemExit(problem)
    return path


if __name__ == "__main__":
    sys.exit(main())
