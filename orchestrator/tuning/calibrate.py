"""Measured rates of this machine for a study's estimate (``tuning.estimate``), cached per machine and setting.

For each method of the space, with the real model at the space's precision, batch and threads: build the run
(``worker.build_trial_model`` + ``build_training_data``), one warm-up and ``steps`` timed optimizer steps of
``worker.train_step`` on the real length-grouped stream, then ``items`` val items per task (16 by default: one full
scoring batch of ``eval.batch_size`` rows or more, as in a run's long pools) scored by
``worker.evaluate_sharded`` under the run's eval precision. Mean real tokens per training example per task come
from the same encoding. The zero-shot reference is scored at the rate of ``lora`` (the base model plus an
adapter whose update starts at zero: the closest measured thing to the base model), else of the first method.

To stay short (a few minutes), the data are encoded from ``CAL_TRAIN_LIMIT`` examples per task; the setup time
scales the measured encoding time to the run's full stream. The rates are those of one trial alone on this
machine: two trials at once on two cores share memory bandwidth, and others' jobs on a shared machine slow the
measurement, so ``--recalibrate`` after the machine has gone quiet. How much two (or ``c``) trials at once slow each
other is measured too, with the first method's training in ``c`` processes started together
(``tuning.contention``), and so are the cores Ray's own processes take beside ``c`` trials on CPUs
(``tuning.ray_overhead``); the estimate scales every run by both.

Cache: ``~/.cache/malora/calibration/<sha256 of the key>.json``; the key holds the CPU model and flags
(``models.hardware.cpu_info``), the GPUs, torch's version, the model, the resolved precisions, the threads, the
batch, the data's encoding settings and every method's configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from orchestrator.spec.space import SearchSpec
from orchestrator.tuning.estimate import Rates, RunShape, evaluations, probe_examples

logger = logging.getLogger(__name__)
CACHE_DIR = Path.home() / ".cache" / "malora" / "calibration"
CAL_TRAIN_LIMIT = 200  # examples per task encoded for the calibration (the length distribution, not the stream)


def calibration_key(spec: SearchSpec, configs: dict[str, dict[str, Any]], *, steps: int, items: int,
                    slots: int = 1, ray: bool = False) -> dict:
    """What the rates depend on (module docstring)."""
    import torch

    from orchestrator.models.hardware import cpu_info, gpu_info
    from orchestrator.models.precision import plan_run

    device = "cuda" if spec.resources.gpus_per_worker > 0 else "cpu"
    train, score = plan_run(spec.model.dtype, spec.train.precision, spec.eval.precision, device)
    d = spec.data
    return {"version": 1, "cpu": cpu_info(), "gpus": [g["name"] for g in gpu_info()], "torch": torch.__version__,
            "model": spec.model.name, "precision": [train.name, score.name, str(train.weights)],
            "threads": max(1, int(round(spec.resources.cpus_per_worker))), "batch_size": spec.train.batch_size,
            **({"compile": True} if spec.train.compile else {}),   # absent when off: earlier caches stay valid
            "eval_batch_size": spec.eval.batch_size, "scoring": spec.eval.scoring,
            "data": {"suite": d.suite, "tasks": list(d.tasks or ()), "data_dir": d.data_dir, "split_seed": d.split_seed,
                     "max_length": d.max_length, "formulation": d.formulation, "template": d.template},
            "configs": configs, "steps": steps, "items": items,
            **({"slots": slots} if slots > 1 else {}),   # the slowdown of that many trials at once (contention)
            **({"ray_overhead": True} if ray else {})}   # Ray's own cores measured too (ray_overhead)


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return CACHE_DIR / f"{digest}.json"


def cached_rates(spec: SearchSpec, configs: dict[str, dict[str, Any]], *, steps: int = 3, items: int = 16,
                 slots: int = 1, refresh: bool = False, ray: bool = True) -> tuple[Rates, dict]:
    """(rates, {"path", "cached", "measured_at", "calibration_s"}): from the cache, else measured and stored;
    ``slots`` trials at once: their slowdown is measured too (``tuning.contention``), and with ``ray`` the cores
    Ray's own processes take beside CPU trials (``tuning.ray_overhead``: a local Ray for about a minute)."""
    from orchestrator.tuning import ray_overhead
    from orchestrator.tuning.contention import measure_slowdown

    ray = ray and spec.resources.gpus_per_worker == 0
    key = calibration_key(spec, configs, steps=steps, items=items, slots=slots, ray=ray)
    path = cache_path(key)
    if path.exists() and not refresh:
        stored = json.loads(path.read_text())
        return Rates(**stored["rates"]), {"path": str(path), "cached": True, **stored["meta"]}
    t0 = time.perf_counter()
    rates = measure(spec, configs, steps=steps, items=items)
    contention = measure_slowdown(spec, next(iter(configs.values())), steps=steps, slots=slots,
                                  data_spec=calibration_spec(spec, None))
    rates = dataclasses.replace(rates, slowdown=contention["slowdown"], slowdown_slots=slots)
    if ray:
        cores = ray_overhead.measure_ray_cores(spec, slots)["ray_cores"]
        rates = dataclasses.replace(rates, ray_cores=cores, ray_slowdown=ray_overhead.ray_factor(
            cores, slots, ray_overhead.trial_cpus(spec), float(os.cpu_count() or 1)))
    meta = {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "calibration_s": round(time.perf_counter() - t0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "rates": dataclasses.asdict(rates), "meta": meta}, indent=1,
                               default=str))
    return rates, {"path": str(path), "cached": False, **meta}


def calibration_spec(spec: SearchSpec, task: str | None) -> SearchSpec:
    """The space with ``CAL_TRAIN_LIMIT`` training examples per task (of one task, or the whole suite)."""
    limit = min(spec.data.train_limit or CAL_TRAIN_LIMIT, CAL_TRAIN_LIMIT)
    data = dataclasses.replace(spec.data, train_limit=limit, num_train_examples=None)
    if task is not None:
        data = dataclasses.replace(data, suite=None, tasks=(task,))
    return dataclasses.replace(spec, data=data)


def measure(spec: SearchSpec, configs: dict[str, dict[str, Any]], *, steps: int, items: int) -> Rates:
    """Rates of every method in ``configs`` on this machine (module docstring)."""
    import torch

    from orchestrator.data.suites import load_pools
    from orchestrator.training import worker
    from orchestrator.tuning import contention
    from orchestrator.tuning.study import mixture_counts

    device = torch.device("cuda" if spec.resources.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
    full_examples = sum(mixture_counts(spec).values())
    tokens, train_rate, score, setup = {}, {}, {}, {}
    for kind, config in configs.items():
        t0 = time.perf_counter()
        trial = worker.build_trial_model(spec, config, device)
        t_model = time.perf_counter() - t0
        if not tokens:  # per task: the mean real tokens of a training example (data only, once)
            for task in load_pools(spec).tasks:
                enc, _, _ = worker.build_training_data(calibration_spec(spec, task), trial.tokenizer)
                tokens[task] = sum(len(e["input_ids"]) for e in enc) / len(enc)
        t1 = time.perf_counter()
        encoded, pools, _ = worker.build_training_data(calibration_spec(spec, None), trial.tokenizer)
        setup[kind] = t_model + (time.perf_counter() - t1) * full_examples / len(encoded)
        train_rate[kind], warm_s, step_s = contention.train_rate(spec, trial, encoded, steps, device)
        setup[kind] += max(0.0, warm_s - step_s)      # train.compile: its compilation
        score[kind] = {}
        with trial.eval_precision.context(device.type), worker.eager_scoring():
            first = next(iter(pools["val"]))
            worker.evaluate_sharded(trial.model, trial.tokenizer, {first: pools["val"][first][:1]}, spec, 0, 1,
                                    device)  # warm-up
            for task, pool in pools["val"].items():
                t2 = time.perf_counter()
                worker.evaluate_sharded(trial.model, trial.tokenizer, {task: pool[:items]}, spec, 0, 1, device)
                score[kind][task] = (time.perf_counter() - t2) / len(pool[:items])
        logger.info("calibration %s: %.0f tokens/s, %.2f s/item, setup %.0f s", kind, train_rate[kind],
                    sum(score[kind].values()) / len(score[kind]), setup[kind])
        del trial
    score["zero_shot"] = dict(score["lora" if "lora" in score else next(iter(configs))])
    return Rates(train_rate, score, setup, tokens)


def study_shapes(spec: SearchSpec, runs: list[dict[str, Any]], splits: dict[str, dict],
                 mixture: dict[str, int]) -> list[RunShape]:
    """The counts of each run of a study grid (``tuning.study.plan_runs``): steps, tasks, val/test items."""
    from orchestrator.tuning.study import SINGLE_TASK

    t = spec.train
    per_step = t.batch_size * t.grad_accum * spec.resources.workers_per_trial
    out = []
    for run in runs:
        tasks = {run["task"]: run["num_train_examples"]} if run["role"] == SINGLE_TASK else dict(mixture)
        steps = run.get("max_steps") or t.max_steps or math.ceil(t.epochs * sum(tasks.values()) / per_step)
        name = f"{run['role']} {run['task'] or run['method']} seed {run['seed']}"
        out.append(RunShape(name, run["method"], steps, per_step, tasks,
                            {k: splits[k]["val"] for k in tasks}, {k: splits[k]["test"] for k in tasks},
                            evaluations(steps, spec.eval.every_n_steps), probe_examples(spec, len(tasks))))
    return out


def study_estimate_text(spec: SearchSpec, *, refresh: bool = False) -> str:
    """The --dry-run lines of a study with fixed configurations: the measured rates and the wall-time estimate."""
    from orchestrator.tuning.estimate import describe_estimate, estimate, slowdown_text
    from orchestrator.tuning.plan import concurrency
    from orchestrator.tuning.study import fixed_configs, mixture_counts, plan_runs
    from orchestrator.data.suites import load_pools

    configs = fixed_configs(spec)
    runs = plan_runs(spec, configs)
    splits = load_pools(spec).splits()
    slots = concurrency(spec, {"CPU": float(os.cpu_count() or 1)})
    rates, meta = cached_rates(spec, configs, slots=slots, refresh=refresh)
    zero_items = {t: s["val"] + s["test"] for t, s in splits.items()} if spec.study.zero_shot else {}
    est = estimate(study_shapes(spec, runs, splits, mixture_counts(spec)), rates, slots=slots,
                   zero_shot_items=zero_items)
    source = (f"cached {meta['path']}" if meta["cached"] else f"measured now in {meta['calibration_s']} s, stored "
              f"in {meta['path']}")
    lines = [f"  rates        measured {meta['measured_at']} ({source}; --recalibrate to measure again), one trial "
             f"alone: " + ", ".join(f"{m} {r:.0f} tokens/s" for m, r in rates.train_tokens_per_s.items())
             + slowdown_text(rates, slots),
             "               scoring s/item: " + "; ".join(
                 f"{m} " + " ".join(f"{t} {s:.2f}" for t, s in per.items())
                 for m, per in rates.score_s_per_item.items() if m != "zero_shot"),
             "               tokens/example: " + ", ".join(f"{t} {n:.0f}" for t, n in rates.tokens_per_example.items()),
             describe_estimate(est, spec.study.time_bound_min * 60)]
    return "\n".join(lines)
