"""``python -m orchestrator.search --report-only``: the search report written again from what the search stored,
without Ray and without training (after a change to the report, or for a search stopped before its end).

The trials come from the Tune experiment in ``<storage>/<name>`` (``ExperimentAnalysis``, read only), their state
from Tune's own record (a trial that was still pending or running when the search stopped says so, instead of
passing for one that ASHA stopped); what only MLflow kept is read back from the trials' nested runs: the test
scores of the chosen trials (``tuning.chosen``) and ``val/mean_acc`` at every step, which fills the evaluations
that a restart dropped from Tune's files for a trial whose results do not carry them
(``evaluation.metrics.HISTORY_KEY``, from before they did). The wall time is the search's clock
(``search_clock.json``); the command is the first launch's, and this one is recorded beside it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from orchestrator.report import summary, tracking
from orchestrator.spec.space import SearchSpec
from orchestrator.training.eval_window import evaluations_done

logger = logging.getLogger("orchestrator.search")
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def stored_rows(spec: SearchSpec, exp_path: str) -> list[dict[str, Any]]:
    """The report's trial rows (``report.summary.trial_rows``) from the stored Tune experiment; a trial Tune had
    not finished keeps Tune's state (``PENDING``, ``RUNNING``, ``PAUSED``)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    analysis = ExperimentAnalysis(exp_path)
    rows = summary.trial_rows(ResultGrid(analysis), spec)
    state = {t.trial_id: t.status for t in analysis.trials}
    for r in rows:
        if state.get(r["trial_id"]) in UNFINISHED:
            r["status"] = state[r["trial_id"]]
    return rows


def add_logged(rows: list[dict[str, Any]], uri: str, exp_id: str, parent_id: str, every_n_steps: int) -> None:
    """Into ``rows``, from each trial's nested MLflow run: the chosen trials' ``test/*`` scores, and the val mean
    accuracy of evaluations the row's ``val_history`` lacks (MLflow's step -> evaluations)."""
    client = tracking.client(uri)
    for run in tracking.find_runs(uri, exp_id):
        tags = run.data.tags
        row = next((r for r in rows if r["trial_id"] == tags.get(tracking.TRIAL_KEY)), None)
        if row is None or tags.get(tracking.PARENT) != parent_id:
            continue
        row.update({k: v for k, v in run.data.metrics.items() if k.startswith("test/")})
        logged = {evaluations_done(m.step, every_n_steps): m.value
                  for m in client.get_metric_history(run.info.run_id, "val/mean_acc") if m.step > 0}
        row["val_history"] = dict(sorted({**logged, **(row.get("val_history") or {})}.items()))


def search_parent(uri: str, exp_id: str, exp_path: str) -> str | None:
    """The search's MLflow parent run (by its search key), or None."""
    runs = [r for r in tracking.find_runs(uri, exp_id, malora__search_key=exp_path)
            if tracking.PARENT not in r.data.tags]
    return runs[0].info.run_id if runs else None


def rebuild_report(spec: SearchSpec, *, tracking_uri: str | None, out_dir: str | None, command: str) -> int:
    """Write the report again (module docstring); 2 when ``<storage>/<name>`` holds no search."""
    from ray import tune

    from orchestrator.tuning.run import search_clock, write_search_report

    exp_path = f"{spec.storage_path}/{spec.name}"
    if not tune.Tuner.can_restore(exp_path):
        print(f"error: {exp_path} holds no search to report. Fix: the --space, --storage-path and --name of the "
              "search (its report is rebuilt from what it stored)", file=sys.stderr)
        return 2
    rows = stored_rows(spec, exp_path)
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking.tracking_uri)
    exp = tracking.client(uri).get_experiment_by_name(spec.tracking.experiment)
    parent_id = search_parent(uri, exp.experiment_id, exp_path) if exp is not None else None
    if parent_id is None:
        logger.warning("no MLflow parent run of %s in %s: the report has no test scores and no MLflow copy",
                       exp_path, uri)
    else:
        add_logged(rows, uri, exp.experiment_id, parent_id, spec.eval.every_n_steps)
    clock = search_clock(spec).summary()
    first = clock["launches"][0]["command"] if clock["launches"] else None
    places = write_search_report(spec, rows, uri, parent_id, out_dir=out_dir, command=first, clock=clock,
                                 report_command=command)
    print("Search report: " + ", ".join(f"{p}/report.md" for p in places))
    return 0
