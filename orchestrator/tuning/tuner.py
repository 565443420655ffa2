"""The Ray Tune ``Tuner`` of a search: one Optuna study per method (``tuning.searcher``, which also builds their
samplers), ASHA, and restore for --resume."""

from __future__ import annotations

from typing import Any

from orchestrator.spec.space import SearchSpec
from orchestrator.tuning.live import search_reporter
from orchestrator.tuning.plan import asha_max_t


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def build_scheduler(spec: SearchSpec):
    """ASHA on the first objective, its time unit the evaluations a trial has done (``orchestrator.tuning.asha``);
    FIFO when ASHA is off."""
    from ray.tune.schedulers import FIFOScheduler

    from orchestrator.tuning.asha import TIME_ATTR, ResumableASHA

    a = spec.search.asha
    if not a.enabled:
        return FIFOScheduler()
    return ResumableASHA(time_attr=TIME_ATTR, metric=spec.metric, mode=spec.objectives[spec.metric],
                         max_t=asha_max_t(spec), grace_period=a.grace_period, reduction_factor=a.reduction_factor)


def build_tuner(spec: SearchSpec, reference: dict[str, float], callback: Any, max_concurrent: int, resume: bool):
    """A fresh Tuner, or the restored one when resuming an existing experiment."""
    from ray import tune

    from orchestrator.training.driver import trial_driver
    from orchestrator.tuning.searcher import PerMethodSearch, journal_dir

    # search trials score val only: test is scored after choosing, for the chosen trials (tuning.chosen)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, spec=spec, reference=reference,
                                                         score_test=False),
                                    {"cpu": spec.resources.trial_driver_cpus})
    exp_path = f"{spec.storage_path}/{spec.name}"
    if resume and tune.Tuner.can_restore(exp_path):
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        local = getattr(tuner, "_local_tuner", None)  # use this run's MLflow callback (new --tracking-uri etc.)
        if local is not None:
            local.get_run_config().callbacks = [callback]
            local.get_run_config().progress_reporter = search_reporter(spec)
            # Ray restores no scheduler state: a fresh ResumableASHA rebuilds its rungs from the trials' history
            local._tune_config.scheduler = build_scheduler(spec)
        return tuner, True
    s = spec.search
    # one Optuna study per method, equal quotas, each in a journal file beside the Tune state
    searcher = PerMethodSearch(spec, max_concurrent, journal_dir(spec))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=build_scheduler(spec), num_samples=s.num_trials,
                                    max_concurrent_trials=max_concurrent, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path, callbacks=[callback],
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1,
                                  progress_reporter=search_reporter(spec)),
    )
    return tuner, False
