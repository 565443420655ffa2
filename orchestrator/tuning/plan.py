"""The resolved plan of a search: resources per trial, concurrency, ASHA's horizon, and the --dry-run text."""

from __future__ import annotations

import math
import os

from orchestrator.spec.space import SearchSpec


def trial_slot(spec: SearchSpec) -> dict[str, float]:
    """Logical resources one trial holds: its driver plus ``workers_per_trial`` workers."""
    r = spec.resources
    return {"CPU": r.workers_per_trial * r.cpus_per_worker, "GPU": r.workers_per_trial * r.gpus_per_worker}


def concurrency(spec: SearchSpec, cluster: dict[str, float]) -> int:
    """max_concurrent_trials: the YAML's number, or ("auto") how many trial slots the cluster's totals fit."""
    mct = spec.resources.max_concurrent_trials
    if mct != "auto":
        return int(mct)
    slot, fits = trial_slot(spec), []
    for key in ("CPU", "GPU"):
        if slot[key] > 0:
            fits.append(int(math.floor(cluster.get(key, 0.0) / slot[key] + 1e-9)))
    return max(1, min([*fits, spec.search.num_trials]))


def describe(spec: SearchSpec, cluster: dict[str, float] | None = None) -> str:
    """The resolved plan, as printed by --dry-run."""
    d, t, s, r = spec.data, spec.train, spec.search, spec.resources
    cluster = cluster or {"CPU": float(os.cpu_count() or 1)}
    lines = [f"search {spec.name!r} from {spec.source}",
             f"  storage      {spec.storage_path}/{spec.name}",
             f"  model        {spec.model.name} ({spec.model.dtype})",
             f"  data         {d.suite or ','.join(d.tasks)} from {d.data_dir}; train_limit={d.train_limit} "
             f"val_limit={d.val_limit} test_limit={d.test_limit} split_seed={d.split_seed} max_length={d.max_length} "
             f"mixing={d.mixing} template={d.template}",
             f"  train        {'max_steps=' + str(t.max_steps) if t.max_steps else 'epochs=' + str(t.epochs)} "
             f"batch={t.batch_size}x{t.grad_accum} lr={t.lr:g} {t.schedule} warmup={t.warmup_ratio} "
             f"wd={t.weight_decay} {t.precision} seed={t.seed}",
             f"  eval         every {spec.eval.every_n_steps} steps, {spec.eval.scoring} scoring "
             f"({spec.data.formulation})",
             f"  search       {s.num_trials} trials ({s.num_trials // max(1, len(spec.methods))} per method, one "
             f"study each), {s.sampler} (seed {s.seed}), objectives {spec.objectives}",
             f"  asha         {'on' if s.asha.enabled else 'off'} (grace {s.asha.grace_period}, "
             f"rf {s.asha.reduction_factor}, max_t {asha_max_t(spec)} evaluations)",
             f"  resources    {r.workers_per_trial} worker(s) x {r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU; "
             f"max_concurrent_trials {r.max_concurrent_trials} -> {concurrency(spec, cluster)} on {cluster}",
             f"  tracking     {spec.tracking.tracking_uri or 'default'} experiment {spec.tracking.experiment!r}",
             "  methods"]
    for m in spec.methods:
        lines.append(f"    {m.kind:7s} " + ", ".join(f"{n}={dom.describe()}" for n, dom in m.hparams))
    for p in s.points_to_evaluate or ():
        lines.append(f"  first trial  {p}")
    return "\n".join(lines)


def asha_max_t(spec: SearchSpec) -> int:
    if spec.search.asha.max_t:
        return spec.search.asha.max_t
    if spec.train.max_steps:
        return max(1, math.ceil(spec.train.max_steps / spec.eval.every_n_steps))
    return 10_000
