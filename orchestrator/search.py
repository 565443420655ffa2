"""``python -m orchestrator.search --space FILE``: a Ray Tune + Optuna search over adapter methods, tracked in MLflow.

Each trial is a Tune function (``trial_driver``, a 0.01-CPU slot) that fits a Ray Train ``TorchTrainer``
(``workers_per_trial`` DDP workers); Optuna (TPE, or NSGA-II for accuracy vs trainable parameters) proposes the
conditional hyperparameters, ASHA stops weak trials, and MLflow gets one parent run plus a nested run per trial.

Embedded defaults: a local Ray (dashboard on 127.0.0.1, needed to free a stopped trial's placement group) and
a SQLite MLflow store in the working directory. ``--address``/``RAY_ADDRESS`` joins a cluster and
``--tracking-uri``/``MLFLOW_TRACKING_URI`` a tracking server. ``--resume`` continues ``<storage>/<name>``:
finished trials are kept, unfinished and errored ones restarted (from their last adapter checkpoint).
Exit codes: 0 done, 1 no trial succeeded, 2 invalid input (nothing started).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from orchestrator.space import SearchSpec, SpaceError, load_space

logger = logging.getLogger("orchestrator.search")
TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # default 2 s: a report waits up to one poll (see benchmarks)
    "TUNE_GLOBAL_CHECKPOINT_S": "2",               # experiment state is tiny; keep it fresh for --resume
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved plan; start nothing")
    p.add_argument("--smoke-test", action="store_true", help="shrink steps, eval items and trials (CPU, minutes)")
    p.add_argument("--resume", action="store_true", help="continue <storage_path>/<name> if it holds a search")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI, else SQLite)")
    p.add_argument("--storage-path", default=None, help="override storage_path of the YAML")
    p.add_argument("--num-trials", type=int, default=None, help="override search.num_trials")
    p.add_argument("--experiment", default=None, help="override tracking.experiment (MLflow experiment name)")
    p.add_argument("--name", default=None, help="override name (the search folder under the storage path)")
    p.add_argument("--data-dir", default=None, help="override data.data_dir; 'hub' loads the tasks from the "
                   "Hugging Face Hub")
    return p


def cli_overrides(args: argparse.Namespace) -> dict:
    """Command-line values as search-space overrides (validated with the file, after --smoke-test)."""
    out: dict = {}
    if args.num_trials is not None:
        out["search"] = {"num_trials": args.num_trials}
    if args.experiment:
        out["tracking"] = {"experiment": args.experiment}
    if args.data_dir:
        out["data"] = {"data_dir": None if args.data_dir == "hub" else str(Path(args.data_dir).expanduser().resolve())}
    if args.name:
        out["name"] = args.name
    if args.storage_path:
        out["storage_path"] = args.storage_path
    return out


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
             f"eval_limit={spec.eval.eval_limit} max_length={d.max_length} mixing={d.mixing} template={d.template}",
             f"  train        {'max_steps=' + str(t.max_steps) if t.max_steps else 'epochs=' + str(t.epochs)} "
             f"batch={t.batch_size}x{t.grad_accum} lr={t.lr:g} {t.schedule} warmup={t.warmup_ratio} "
             f"wd={t.weight_decay} {t.precision} seed={t.seed}",
             f"  eval         every {spec.eval.every_n_steps} steps, {spec.eval.scoring} scoring ({spec.eval.options})",
             f"  search       {s.num_trials} trials, {s.sampler} (seed {s.seed}), objectives {spec.objectives}",
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


# ------------------------------------------------------------------------------------------------ Ray
def prepare_env(address: str | None) -> None:
    """Environment for Ray, set before ``import ray`` (Ray caches the auth mode at import).

    Lowers the Train health-check poll and Tune's state-save period; when joining a cluster, adds the token-auth
    mode its clients need (orchestrator.raycluster). A local ``ray.init`` manages its own token.
    """
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if address or os.environ.get("RAY_ADDRESS"):
        from orchestrator.raycluster import ray_auth_env

        os.environ.update(ray_auth_env())


def init_ray(address: str | None) -> dict[str, float]:
    """Start (or join) Ray and return the cluster's total resources.

    Locally: the dashboard on 127.0.0.1 at a free port, announced to every worker as ``RAY_API_SERVER_ADDRESS``.
    Ray Train's placement-group cleaner finds the State API through it; left to auto-detection it fails with
    "Found multiple active Ray instances" when another Ray runs on the machine, and stopped trials then leak
    their placement groups (later trials hang).
    """
    import ray

    env_vars = {k: os.environ[k] for k in TRAIN_ENV_DEFAULTS}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        injected = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}")
        taken = set(((injected.get("runtime_env") or {}).get("env_vars") or {}))
        gcs = address if address != "auto" else os.environ.get("RAY_ADDRESS", "")
        if gcs and gcs != "auto" and "://" not in gcs:  # workers' State API calls find this cluster, not another
            env_vars["RAY_ADDRESS"] = gcs
        ray.init(address=address, runtime_env={"env_vars": {k: v for k, v in env_vars.items() if k not in taken}})
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        api = f"http://127.0.0.1:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = env_vars["RAY_API_SERVER_ADDRESS"] = api
        temp = Path(os.environ.get("MALORA_RAY_TMP", f"/tmp/malora-ray-{os.getuid()}"))
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, _temp_dir=str(temp),
                 runtime_env={"env_vars": env_vars}, logging_level=logging.WARNING)
    return dict(ray.cluster_resources())


def cached_reference(spec: SearchSpec) -> dict[str, float]:
    """Base zero-shot accuracy per task: read from <storage>/<name>/reference.json or computed once (a Ray task)."""
    import ray

    key = {"model": spec.model.name, "dtype": spec.model.dtype, "suite": spec.data.suite,
           "tasks": list(spec.data.tasks or ()), "eval_limit": spec.eval.eval_limit, "scoring": spec.eval.scoring,
           "template": spec.data.template, "options": spec.eval.options, "seed": spec.train.seed,
           "data_dir": spec.data.data_dir}
    path = Path(spec.storage_path) / spec.name / "reference.json"
    if "://" not in spec.storage_path and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["accuracy"]
    from orchestrator.trainable import base_accuracy

    r = spec.resources
    task = ray.remote(num_cpus=max(0.01, r.cpus_per_worker - r.trial_driver_cpus),
                      num_gpus=r.gpus_per_worker)(base_accuracy)
    t0 = time.perf_counter()
    accuracy = ray.get(task.remote(spec))
    logger.info("base zero-shot accuracy %s (%.1f s)", accuracy, time.perf_counter() - t0)
    if "://" not in spec.storage_path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "accuracy": accuracy}, indent=1))
        tmp.replace(path)
    return accuracy


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(spec: SearchSpec, reference: dict[str, float], callback: Any, max_concurrent: int, resume: bool):
    """A fresh Tuner, or the restored one when resuming an existing experiment."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.hparams import ConditionalSpace, optuna_points
    from orchestrator.trainable import trial_driver

    trainable = tune.with_resources(tune.with_parameters(trial_driver, spec=spec, reference=reference),
                                    {"cpu": spec.resources.trial_driver_cpus})
    exp_path = f"{spec.storage_path}/{spec.name}"
    if resume and tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        local = getattr(tuner, "_local_tuner", None)  # use this run's MLflow callback (new --tracking-uri etc.)
        if local is not None:
            local.get_run_config().callbacks = [callback]
        return tuner, True
    objectives = spec.objectives
    s = spec.search
    if s.sampler == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=s.seed, population_size=max(4, min(50, s.num_trials // 2)))
    elif s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials, multivariate=True,
                                             group=True)
    multi = len(objectives) > 1
    searcher = OptunaSearch(space=ConditionalSpace(spec.methods), sampler=sampler,
                            metric=list(objectives) if multi else spec.metric,
                            mode=list(objectives.values()) if multi else objectives[spec.metric],
                            points_to_evaluate=optuna_points(spec.methods, s.points_to_evaluate) or None)
    scheduler = (ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=objectives[spec.metric],
                               max_t=asha_max_t(spec), grace_period=s.asha.grace_period,
                               reduction_factor=s.asha.reduction_factor) if s.asha.enabled else FIFOScheduler())
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_trials,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, callbacks=[callback],
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )
    return tuner, False


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        spec = load_space(args.space, smoke_test=args.smoke_test, overrides=cli_overrides(args))
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(describe(spec))
        return 0
    prepare_env(args.address)
    from ray import tune

    exp_path = f"{spec.storage_path}/{spec.name}"
    if not args.resume and tune.Tuner.can_restore(exp_path):
        print(f"error: {exp_path} already holds a search. Fix: pass --resume to continue it, or --name/--storage-path "
              "for a new one", file=sys.stderr)
        return 2
    from orchestrator import summary, tracking

    t0 = time.perf_counter()
    cluster = init_ray(args.address)
    uri = tracking.resolve_tracking_uri(args.tracking_uri, spec.tracking.tracking_uri)
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment)
    parent_id, reused = tracking.parent_run(uri, exp_id, exp_path, spec.name, reuse=args.resume)
    try:
        reference = cached_reference(spec)
        if not reused:
            summary.log_search_params(uri, parent_id, spec, reference)
        callback = tracking.MLflowSearchCallback(uri, exp_id, parent_id, exp_path, spec, reference)
        tuner, restored = build_tuner(spec, reference, callback, concurrency(spec, cluster), args.resume)
        logger.info("%s search %s: %d trials, %d at a time; MLflow parent run %s", "resuming" if restored
                    else "starting", exp_path, spec.search.num_trials, concurrency(spec, cluster), parent_id)
        results = tuner.fit()
    except KeyboardInterrupt:
        tracking.client(uri).set_terminated(parent_id, "KILLED")
        raise
    except Exception as exc:
        tracking.log_dict(uri, parent_id, tags={"malora.failure_reason": tracking.failure_reason(str(exc))})
        tracking.client(uri).set_terminated(parent_id, "FAILED")
        raise
    rows = summary.trial_rows(results, spec)
    interrupted = results.num_terminated + results.num_errors < max(len(results), spec.search.num_trials)
    text = summary.finish(uri, parent_id, spec, rows, Path(spec.storage_path) / spec.name, time.perf_counter() - t0,
                          status="KILLED" if interrupted else "FINISHED")
    print(text)
    print(f"\nMLflow UI:  {tracking.ui_command(uri)}")
    if interrupted:
        print("\nThe search was interrupted; continue it with the same command plus --resume.", file=sys.stderr)
        return 130
    return 0 if any(r["status"] in ("TERMINATED", "STOPPED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
