"""A study: choose each method's configuration on val, retrain it over seeds, score it once on test, compare.

Steps (``python -m orchestrator.study``), all on Ray Tune + Train + MLflow like the search:

1. **Choose** -- the search of the same space (``study.search: true``; or ``--from-search NAME`` to reuse a
   finished one): per method, the completed trial (full budget, not early-stopped) with the best final val
   objective. With ``study.search: false``, the configurations of ``study.configs`` (e.g. the papers').
2. **Replicate** -- each chosen configuration trained with ``study.seeds`` training seeds, the first ones from
   ``train.seed`` up that no search trial trained with (``tuning.record.replicate_seeds``): the search winner's
   luck on val never reappears as a replicate. The pools stay the same (``data.split_seed``), so every run is
   scored on the same val and test items.
3. **References** -- per task, the ``study.single_task_method`` configuration trained on that task alone with the
   same per-task examples and seeds as in the mixture (the papers' "(ST)" rows): ``data.num_train_examples`` = the
   task's count in the mixed stream and, for a step budget, ``max_steps · share`` steps; plus the zero-shot base
   model on test.
4. **Report** -- :mod:`orchestrator.report.study_report`: intervals, Δ vs single-task, paired comparisons, seesaw.

Steps 2 and 3 are one Tune experiment ``<storage>/<name>-study`` over a grid of run descriptions
(``{"run": {role, method, seed, task, config, ...}}``); each trial fits one ``TorchTrainer`` exactly like a search
trial. The chosen configurations, the run grid and the seeds used where are recorded at first launch in
``<storage>/<name>-study/plan.json`` (``tuning.record``); ``--resume`` reads them (never recomputes them) and
refuses a changed space, restores the Tune experiment: finished runs are kept, unfinished ones continue from
their checkpoint, and the MLflow runs are found again by tag (none duplicated).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from typing import Any

from orchestrator.spec.hparams import trial_hparams
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger("orchestrator.study")
REPLICATE, SINGLE_TASK = "replicate", "single_task"


class StudyError(ValueError):
    """A study cannot start (missing search, no completed trial for a method); the message says what to do."""


# ------------------------------------------------------------------------------------------------ choose
def fixed_configs(spec: SearchSpec) -> dict[str, dict[str, Any]]:
    """Tune-style trial configs (``{"method": m, "m.name": value}``) from the constants and ``study.configs``."""
    out = {}
    for method in spec.methods:
        given = (spec.study.configs or {}).get(method.kind) or {}
        config: dict[str, Any] = {"method": method.kind}
        for name, dom in method.hparams:
            value = given.get(name, dom.low if dom.kind == "const" else None)
            config[f"{method.kind}.{name}"] = list(value) if isinstance(value, tuple) else value
        out[method.kind] = config
    return out


def configs_from_search(spec: SearchSpec, exp_path: str) -> dict[str, dict[str, Any]]:
    """Per method, the config of its completed trial with the best final val objective (in the objective's mode)."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(exp_path)
    except Exception as exc:  # Ray raises several types for a missing or unreadable experiment
        raise StudyError(f"no finished search at {exp_path} ({str(exc).splitlines()[0]}). Fix: run the search "
                         "first, or drop --from-search") from None
    mode = spec.objectives[spec.metric]
    best: dict[str, tuple[float, dict]] = {}
    for trial in analysis.trials:
        last = trial.last_result or {}
        value = last.get(spec.metric)
        complete = last.get("step", 0) >= last.get("total_steps", math.inf)
        if trial.status != "TERMINATED" or not complete or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        method, _ = trial_hparams(spec.methods, trial.config)
        if method not in best or (value > best[method][0] if mode == "max" else value < best[method][0]):
            best[method] = (value, {"method": method, **{k: v for k, v in trial.config.items() if k != "method"}})
    missing = [m.kind for m in spec.methods if m.kind not in best]
    if missing:
        raise StudyError(f"the search at {exp_path} has no completed trial for {', '.join(missing)}. Fix: resume an "
                         "interrupted search, run a larger one under a new --name (search.num_trials), or give "
                         "study.configs with study.search: false")
    for method, (value, _) in sorted(best.items()):
        logger.info("chosen on val: %s (%s = %.4f)", method, spec.metric, value)
    return {m: cfg for m, (_, cfg) in best.items()}


# ------------------------------------------------------------------------------------------------ plan
def mixture_counts(spec: SearchSpec) -> dict[str, int]:
    """Training examples of each task in the mixed stream of ``spec`` (what a single-task run must match)."""
    from orchestrator.data.mixing import mix_examples
    from orchestrator.data.suites import load_pools

    d = spec.data
    suite = load_pools(spec)
    mixed = mix_examples(suite.train, d.mixing, temperature=d.mixing_temperature,
                         num_examples=d.num_train_examples, seed=spec.train.seed)
    counts = dict.fromkeys(suite.tasks, 0)
    for task, _ in mixed:
        counts[task] += 1
    return counts


def plan_runs(spec: SearchSpec, configs: dict[str, dict[str, Any]],
              search_seeds: tuple[int, ...] | list[int] = ()) -> list[dict[str, Any]]:
    """The grid of the study's Tune experiment: replicates, then single-task references (see the module doc),
    with seeds disjoint from ``search_seeds`` (the training seeds of the search the configurations came from) and
    from ``study.choice_seeds`` (the probes' and pilots' that fixed a choice)."""
    from orchestrator.tuning.record import replicate_seeds

    st = spec.study
    seeds = replicate_seeds(spec.train.seed, st.seeds, set(search_seeds) | set(st.choice_seeds))
    runs = [{"role": REPLICATE, "method": m.kind, "seed": s, "task": None, "config": configs[m.kind]}
            for m in spec.methods for s in seeds]
    if st.single_task:
        counts = mixture_counts(spec)
        total = sum(counts.values())
        for task, n in counts.items():
            steps = max(1, math.ceil(spec.train.max_steps * n / total)) if spec.train.max_steps else None
            runs += [{"role": SINGLE_TASK, "method": st.single_task_method, "seed": s, "task": task,
                      "config": configs[st.single_task_method], "num_train_examples": n, "max_steps": steps}
                     for s in seeds[:st.single_task_seeds]]  # the first ones (None: all)
    return runs


def run_spec(spec: SearchSpec, run: dict[str, Any]) -> SearchSpec:
    """The search spec one study run trains with: its seed, and for a single-task run its task and budget."""
    train = dataclasses.replace(spec.train, seed=run["seed"])
    data = spec.data
    if run["role"] == SINGLE_TASK:
        data = dataclasses.replace(data, suite=None, tasks=(run["task"],),
                                   num_train_examples=run["num_train_examples"])
        if run.get("max_steps"):
            train = dataclasses.replace(train, max_steps=run["max_steps"])
    return dataclasses.replace(spec, train=train, data=data)


def unfinished_message(results: Any, total: int) -> str:
    """What a launch that ended before every run had its test-scored report says: runs that failed (an error:
    fix it) apart from runs that were only interrupted (Ctrl-C, a stop: ``--resume`` continues them)."""
    failed = sum(1 for r in results if r.error)
    done = sum(1 for r in results if not r.error and "test/mean_acc" in (r.metrics or {}))
    stopped = total - done - failed
    parts = []
    if failed:
        parts.append(f"{failed} of {total} study runs failed (see MLflow): fix the cause and rerun with --resume")
    if stopped:
        parts.append(f"{stopped} of {total} runs unfinished (interrupted or not started): --resume continues them")
    return "error: " + "; ".join(parts)


def study_driver(config: dict[str, Any], spec: SearchSpec, reference: dict[str, float] | None = None) -> None:
    """Tune function trainable of one study run: a search trial on :func:`run_spec` of its description."""
    from orchestrator.training.driver import trial_driver

    run = config["run"]
    trial_driver(run["config"], run_spec(spec, run), reference)


# ------------------------------------------------------------------------------------------------ run
def val_history(result: Any) -> dict[str, list[tuple[int, float]]]:
    """{task: [(step, val primary accuracy)]} of a finished run, from Tune's per-report results."""
    from orchestrator.report.seesaw_report import history_of

    frame = getattr(result, "metrics_dataframe", None)
    return history_of(frame.to_dict("records")) if frame is not None and len(frame) else {}


def study_name(spec: SearchSpec) -> str:
    return f"{spec.name}-study"


def study_splits(spec: SearchSpec) -> dict[str, dict]:
    """The pools' sizes and fingerprints per task, plus ``test_majority``: the constant-answer accuracy on test."""
    from orchestrator.evaluation.accuracy import majority_share
    from orchestrator.data.suites import load_pools

    pools = load_pools(spec)
    splits = pools.splits()
    for task in splits:
        splits[task]["test_majority"] = majority_share(pools.test[task])
    return splits


def run_study(spec: SearchSpec, *, address: str | None, tracking_uri: str | None, resume: bool,
              from_search: str | None, out_dir: str | None, command: str) -> int:
    """Run (or continue) the study of ``spec``; returns the command's exit code (see ``orchestrator.study``)."""
    from ray import tune

    from orchestrator.cluster.runtime import init_ray, prepare_env
    from orchestrator.report import study_report, tracking
    from orchestrator.report.callback import MLflowStudyCallback, journal_path
    from orchestrator.tuning.run import report_skipped
    from orchestrator.tuning.plan import concurrency
    from orchestrator.tuning.provenance import study_provenance
    from orchestrator.tuning.reference import FormulationMismatch, cached_reference, check_formulation
    from orchestrator.tuning.run import run_search
    from orchestrator.tuning.live import study_reporter
    from orchestrator.tuning.record import PlanError, check_resume, read_plan, write_plan
    from orchestrator.tuning.run import preflight
    from orchestrator.tuning.clock import RunClock
    from orchestrator.tuning.tuner import trial_dirname

    prepare_env(address)
    name = study_name(spec)
    exp_path = f"{spec.storage_path}/{name}"
    search_path = f"{spec.storage_path}/{from_search or spec.name}"
    if not resume and tune.Tuner.can_restore(exp_path):
        print(f"error: {exp_path} already holds a study. Fix: pass --resume to continue it, or --name/--storage-path "
              "for a new one", file=sys.stderr)
        return 2
    if from_search and not tune.Tuner.can_restore(search_path):
        print(f"error: --from-search {from_search}: no search at {search_path}. Fix: name a finished search under "
              f"{spec.storage_path}", file=sys.stderr)
        return 2
    try:  # configurations chosen in one formulation are not replicated and compared in another
        for name_ in {spec.name, from_search or spec.name}:
            check_formulation(dataclasses.replace(spec, name=name_))
    except FormulationMismatch as exc:
        print(f"error: data.formulation: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if spec.study.search and not from_search:
        if not resume and tune.Tuner.can_restore(search_path):
            print(f"error: {search_path} already holds a search. Fix: reuse it with --from-search {spec.name}, or "
                  "pass --resume", file=sys.stderr)
            return 2
    recorded = read_plan(spec, name) if resume else None
    if recorded is not None:
        try:
            check_resume(spec, recorded, "study")
        except PlanError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if not spec.study.search and not from_search and recorded is None:
        problem = preflight(spec, fixed_configs(spec))  # the search's own preflight covers the searched case
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    start = study_report.start_record(spec, command, resume=resume)  # after the checks: they change nothing
    clock = RunClock(spec.storage_path, spec.name).start(command, resume=resume, code=study_report.commit_state())
    if spec.study.search and not from_search:
        code = run_search(spec, address=address, tracking_uri=tracking_uri, resume=resume)
        if code != 0:
            print(f"error: the study's search ended with exit code {code}; fix it, then rerun with --resume",
                  file=sys.stderr)
            return code
    cluster = init_ray(address)
    if recorded is not None:  # what the first launch chose and planned, not a fresh choice
        configs, runs, plan = recorded["configs"], recorded["runs"], recorded
        logger.info("study plan from %s: %d runs, seeds %s", exp_path, len(runs), recorded["seeds"])
    else:
        try:
            configs = (configs_from_search(spec, search_path) if spec.study.search or from_search
                       else fixed_configs(spec))
        except StudyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        searched = bool(spec.study.search or from_search)
        search_plan = (read_plan(spec, from_search or spec.name) or {}) if searched else {}
        # a search recorded before plans existed trained every trial with train.seed
        search_seeds = sorted(search_plan.get("seeds", {}).get("search", [spec.train.seed])) if searched else []
        runs = plan_runs(spec, configs, search_seeds)
        seeds = {"search": search_seeds, "choice": sorted(spec.study.choice_seeds),
                 "replicate": sorted({r["seed"] for r in runs})}
        plan = write_plan(spec, {"kind": "study", "configs": configs, "runs": runs, "seeds": seeds,
                                 "configs_from": search_path if searched else "study.configs"}, name)
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking.tracking_uri)
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment)
    parent_id, _ = tracking.parent_run(uri, exp_id, exp_path, name, reuse=resume, role="study")
    with tracking.closed_on_failure(uri, parent_id):
        tracking.log_dict(uri, parent_id, params={f"seeds.{k}": ",".join(map(str, v))
                                                  for k, v in plan["seeds"].items()})
        reference = cached_reference(spec)
        callback = MLflowStudyCallback(uri, exp_id, parent_id, exp_path, spec, reference["val"],
                                       journal=journal_path(spec.storage_path, name, uri), replay=resume)
        study_spec = dataclasses.replace(spec, name=name)
        trainable = tune.with_resources(
            tune.with_parameters(study_driver, spec=study_spec, reference=reference["val"]),
            {"cpu": spec.resources.trial_driver_cpus})
        if resume and tune.Tuner.can_restore(exp_path):
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            local = getattr(tuner, "_local_tuner", None)  # this run's MLflow callback (new --tracking-uri etc.)
            if local is not None:
                local.get_run_config().callbacks = [callback]
                local.get_run_config().progress_reporter = study_reporter(spec)
        else:
            tuner = tune.Tuner(
                trainable, param_space={"run": tune.grid_search(runs)},
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency(spec, cluster),
                                            trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=spec.storage_path, callbacks=[callback],
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                          progress_reporter=study_reporter(spec)))
        logger.info("study %s: %d runs (%d methods x %d seeds, single-task %s); MLflow parent run %s", exp_path,
                    len(runs), len(spec.methods), spec.study.seeds, spec.study.single_task, parent_id)
        results = tuner.fit()
        # a run counts only with its final, test-scored report (a trial can end without one if it was stopped)
        done = [{"run": r.config["run"], "metrics": dict(r.metrics or {}), "history": val_history(r)}
                for r in results if not r.error and "test/mean_acc" in (r.metrics or {})]
        if len(done) < len(runs):
            print(unfinished_message(results, len(runs)), file=sys.stderr)
            failed = sum(1 for r in results if r.error)
            tracking.log_dict(uri, parent_id, tags={"malora.failure_reason": f"{failed} failed runs, "
                                                    f"{len(runs) - len(done) - failed} unfinished"})
            tracking.client(uri).set_terminated(parent_id, "FAILED" if failed else "KILLED")
            return 1 if failed else 130   # as the search: 130 interrupted
        if spec.study.zero_shot:
            tracking.zero_shot_run(uri, exp_id, parent_id, exp_path, spec, reference)
        wall_s = time.perf_counter() - t0
        try:
            out = study_report.write_report(spec, configs, done, reference if spec.study.zero_shot else None,
                                            study_splits(spec), wall_s=wall_s,
                                            command=command, out_dir=out_dir, uri=uri, parent_id=parent_id,
                                            start=start, provenance_record=study_provenance(spec, done, wall_s=wall_s),
                                            clock=clock.summary())
        except study_report.ReportError as exc:  # runs that cannot share a table: one line, the parent run FAILED
            tracking.log_dict(uri, parent_id, tags={"malora.failure_reason": str(exc)[:1000]})
            tracking.client(uri).set_terminated(parent_id, "FAILED")
            print(f"error: {exc}", file=sys.stderr)
            return 2
    tracking.client(uri).set_terminated(parent_id, "FINISHED")
    print(out["table"])
    report_skipped(callback.skipped(), uri, parent_id)
    print(f"\nresults: {out['dir']}/results.md (and .json, .csv, plots)")
    print(f"MLflow UI:  {tracking.ui_command(uri)}")
    print(f"then open:  {tracking.runs_url(uri, exp_id)}")
    return 0
