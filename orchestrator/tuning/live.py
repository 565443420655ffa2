"""What a user watching a long search or study sees in the terminal: Tune's trial table, chosen for us.

Ray's default ("new") output infers its table columns from the first four numbers of a result (step,
total_steps, evaluations, epoch: nothing a user watches) and shows no hyperparameters for a define-by-run Optuna
space. We use Tune's ``CLIReporter`` instead (``RAY_AIR_NEW_OUTPUT=0``, set in ``cluster.runtime``): columns are
the validation objective, the trial's best value so far, step, tokens/s and ETA-relevant step time; parameters
are the method and each method's searched hyperparameters; the header names the best trial so far.
"""

from __future__ import annotations

import math
from typing import Any

from orchestrator.spec.space import SearchSpec

REPORT_EVERY_S = 30  # seconds between two tables (Tune's default, 5 s, floods a day-long log)


def best_trial_line(trials: list, metric: str, mode: str) -> str | None:
    """"Best so far: <trial> (<method>) <metric>=<value>" over the trials that reported ``metric``.

    Ray's own best-trial line looks up every parameter column in the best trial's config and fails on a
    conditional space, where a LoRA trial has no ``malora.d``; this one names only what the trial has.
    """
    scored = [(t.last_result[metric], t) for t in trials if isinstance((t.last_result or {}).get(metric), (int, float))
              and not math.isnan(t.last_result[metric])]
    if not scored:
        return None
    value, best = (max if mode == "max" else min)(scored, key=lambda vt: vt[0])
    method = best.config.get("method") or (best.config.get("run") or {}).get("method") or ""
    return f"Best so far: {best.trial_id}{f' ({method})' if method else ''} with {metric}={value:.4f}"


def _reporter(columns: dict, params: dict, metric: str | None = None, mode: str | None = None) -> Any:
    from ray.tune import CLIReporter

    class LiveReporter(CLIReporter):
        def report(self, trials: list, done: bool, *sys_info: str) -> None:
            line = best_trial_line(trials, metric, mode) if metric else None
            self._print(((line + "\n") if line else "") + self._progress_str(trials, done, *sys_info))

    return LiveReporter(metric_columns=columns, parameter_columns=params, max_report_frequency=REPORT_EVERY_S)


def search_reporter(spec: SearchSpec) -> Any:
    """The search's trial table: objective, best-so-far, progress; method and searched hyperparameters."""
    metric = spec.metric
    columns = {metric: metric, "val/best_mean_acc": "best val so far", "step": "step", "total_steps": "of",
               "tokens_per_s": "tok/s"}
    params = {"method": "method"} if len(spec.methods) > 1 else {}
    for m in spec.methods:
        params.update({f"{m.kind}.{name}": f"{m.kind}.{name}" for name, dom in m.hparams if dom.kind != "const"})
    return _reporter(columns, params, metric, spec.objectives[metric])


def study_reporter(spec: SearchSpec) -> Any:
    """The study's run table: role, method, seed, task; val, test (once done), progress."""
    columns = {"val/mean_acc": "val", "test/mean_acc": "test", "step": "step", "total_steps": "of",
               "tokens_per_s": "tok/s"}
    params = {"run/role": "role", "run/method": "method", "run/seed": "seed", "run/task": "task"}
    return _reporter(columns, params)
