"""A whole search, once its spec is valid: Ray up, MLflow parent run, the base reference, ``Tuner.fit``, summary.

Exit codes (returned to ``python -m orchestrator.search``): 0 done, 1 no trial succeeded, 2 the storage already
holds a search and ``--resume`` was not given, or its model or data cannot be loaded (checked before Ray starts),
130 interrupted (continue with ``--resume``).
"""

from __future__ import annotations

import logging
import sys

from orchestrator.cluster import storage
from orchestrator.cluster.runtime import init_ray, prepare_env
from orchestrator.spec.space import SearchSpec
from orchestrator.data.suites import load_pools
from orchestrator.tuning.clock import RunClock
from orchestrator.tuning.plan import concurrency
from orchestrator.tuning.reference import FormulationMismatch, cached_reference, check_formulation
from orchestrator.tuning.searcher import dashboard_commands
from orchestrator.tuning.tuner import build_tuner

logger = logging.getLogger("orchestrator.search")


def preflight(spec: SearchSpec, configs: dict[str, dict] | None = None) -> str | None:
    """Why the search cannot start (its model or data files cannot be loaded, its methods' budgets differ), as
    one line; None when it can. ``configs``: a study's fixed Tune-style configs per method (default: every
    corner of each method's domains is checked, ``tuning.budget``).

    Runs in the driver before Ray starts, so bad input costs seconds and no trial, not a traceback per trial.
    """
    from orchestrator.data.schema import DataError
    from orchestrator.models.loading import ModelError, check_model
    from orchestrator.spec.hparams import trial_hparams
    from orchestrator.tuning.budget import BudgetError, budget_lines, check_budget, method_counts

    try:
        check_model(spec.model.name, spec.model.cache_dir)
    except ModelError as exc:
        return f"model.name: {exc}"
    given = {m: [trial_hparams(spec.methods, c)[1]] for m, c in (configs or {}).items()} or None
    counts = method_counts(spec, given)
    try:
        check_budget(spec, counts)
    except BudgetError as exc:
        return f"search.match_budget: {exc}"
    logger.info("trainable parameters per method:\n%s", "\n".join(budget_lines(spec, counts)))
    try:
        load_pools(spec)
    except (DataError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"data: {type(exc).__name__}: {first} (data_dir {spec.data.data_dir})"
    try:  # a search continued (or a name reused) in another formulation would compare across formulations
        check_formulation(spec)
    except FormulationMismatch as exc:
        return f"data.formulation: {exc}"
    return None


def record_search_plan(spec: SearchSpec, resume: bool) -> str | None:
    """Write the search's plan at first launch (``tuning.record``); on --resume check the space against it.
    Returns why the search cannot continue, or None."""
    from orchestrator.tuning.budget import method_counts
    from orchestrator.tuning.record import FINGERPRINTED, PlanError, check_resume, read_plan, write_plan

    recorded = read_plan(spec) if resume else None
    if recorded is not None:
        try:
            check_resume(spec, recorded, "search")
        except PlanError as exc:
            return str(exc)
        return None
    quota = spec.search.num_trials // len(spec.methods)
    counts = method_counts(spec)
    write_plan(spec, {"kind": "search", "seeds": {"search": [spec.train.seed]},
                      "sampler_seeds": {m.kind: spec.search.seed + i for i, m in enumerate(spec.methods)},
                      "trials_per_method": {m.kind: quota for m in spec.methods},
                      "trainable_params": {k: [c.low, c.high] for k, c in counts.items()},
                      "test": "scored after choosing, for the best trial per method and the Pareto front only"},
               names=tuple(g for g in FINGERPRINTED if g != "study"))  # a study of this search may add seeds
    return None


def score_chosen_trials(spec: SearchSpec, rows: list[dict], uri: str, exp_id: str, parent_id: str) -> None:
    """Test scores of the best trial per method and the Pareto front, into their rows and MLflow runs."""
    from orchestrator.report import summary, tracking
    from orchestrator.tuning.chosen import score_chosen

    best, front = summary.choose(spec, rows)
    chosen = list({r["trial_id"]: r for r in best + front}.values())
    for trial_id, metrics in score_chosen(spec, chosen).items():
        row = next(r for r in rows if r["trial_id"] == trial_id)
        row.update({k: v for k, v in metrics.items() if k.startswith("test/")})
        tracking.log_chosen_test(uri, exp_id, parent_id, trial_id, metrics, int(row.get("step") or 0))


def search_clock(spec: SearchSpec) -> RunClock:
    """The search's launches and their running time, ``<storage>/<name>/search_clock.json`` (``tuning.clock``)."""
    return RunClock(spec.storage_path, spec.name, filename="search_clock.json")


def search_provenance(command: str | None, clock: dict, rows: list[dict], report_command: str | None = None
                      ) -> dict:
    """What produced a search report: the command, the checkout's commit (and whether it was dirty), the machine,
    the precisions the trials recorded, and from ``clock`` (``RunClock.summary``) the running time summed over
    every launch (``wall_s``, killed launches included), the span from the first launch (``elapsed_s``) and the
    launches; ``report_command``: the ``--report-only`` command that wrote the report again, if one did."""
    from orchestrator.models.hardware import machine_info
    from orchestrator.report.study_report import commit_state

    return {"command": command, **commit_state(), "machine": machine_info(),
            "precision": sorted({str(r["precision"]) for r in rows if r.get("precision")}),
            "eval_precision": sorted({str(r["eval_precision"]) for r in rows if r.get("eval_precision")}),
            "wall_s": clock.get("running_s"), "elapsed_s": clock.get("elapsed_s"),
            "launches": clock.get("launches", []), **({"report_command": report_command} if report_command else {})}


def write_search_report(spec: SearchSpec, rows: list[dict], uri: str, parent_id: str | None, *,
                        out_dir: str | None, command: str | None, clock: dict, report_command: str | None = None
                        ) -> list[str]:
    """The search report (``report.search_report``) into ``<storage>/<name>/report``, ``out_dir`` when given, and
    the parent run's ``report/`` artifacts (none without ``parent_id``); returns where it was written."""
    from orchestrator.report import search_report, summary, tracking
    from orchestrator.tuning.plan import asha_max_t

    _, front = summary.choose(spec, rows)
    a, max_t = spec.search.asha, asha_max_t(spec)
    n_items = {t: s["val"] for t, s in load_pools(spec).splits().items()}
    kwargs = dict(provenance=search_provenance(command, clock, rows, report_command), n_items=n_items, max_t=max_t,
                  milestones=search_report.rungs(a.grace_period, a.reduction_factor, max_t) if a.enabled else [])
    places = [storage.join(spec.storage_path, spec.name, "report"), *([out_dir] if out_dir else [])]
    for i, place in enumerate(places):
        with storage.local_dir(place) as local:
            files = search_report.write_report(spec, rows, {r["trial_id"] for r in front}, local, **kwargs)
            if i == 0 and parent_id is not None:
                c = tracking.client(uri)
                for f in files:
                    c.log_artifact(parent_id, str(f), "report")
    return places


def report_skipped(skipped: list[tuple[str, str]], uri: str, parent_id: str) -> None:
    """Writes the outbox gave up on (refused, or failing again while the store answered), listed on stderr and as
    a tag of the parent run, so a missing number in MLflow has a stated reason."""
    from orchestrator.report import tracking

    if not skipped:
        return
    lines = [f"  {what}: {error}" for what, error in skipped]
    print(f"\nwarning: {len(skipped)} MLflow write(s) skipped (the store refused them, or they failed again while "
          "it answered):\n" + "\n".join(lines[:20]), file=sys.stderr)
    tracking.log_dict(uri, parent_id, tags={"malora.mlflow_skipped": "\n".join(lines)})


def close_on_abort(uri: str, parent_id: str, callback, status: str, reason: str | None = None,
                   deadline_s: float = 60.0) -> None:
    """The search aborts: end its open nested runs and its parent run with ``status`` (and the reason as a tag),
    waiting up to ``deadline_s`` for an unreachable store; never raises over the original error."""
    from orchestrator.report import tracking
    from orchestrator.report.outbox import Outbox

    if callback is not None:
        callback.close_open_runs(status, deadline_s)
    outbox = Outbox(retry_s=5.0)
    if reason:
        outbox.put("the parent run's failure reason",
                   lambda: tracking.log_dict(uri, parent_id, tags={"malora.failure_reason": reason}))
    outbox.put(f"marking the parent run {status}", lambda: tracking.client(uri).set_terminated(parent_id, status))
    if not outbox.flush(deadline_s):
        logger.error("MLflow unreachable: parent run %s could not be marked %s", parent_id, status)


def run_search(spec: SearchSpec, *, address: str | None, tracking_uri: str | None, resume: bool,
               out_dir: str | None = None, command: str | None = None) -> int:
    """Run (or with ``resume`` continue) the search of ``spec``; returns the command's exit code. The report goes
    to ``<storage>/<name>/report``, ``out_dir`` and the parent run (``write_search_report``)."""
    prepare_env(address)
    from ray import tune

    exp_path = f"{spec.storage_path}/{spec.name}"
    if not resume and tune.Tuner.can_restore(exp_path):
        print(f"error: {exp_path} already holds a search. Fix: pass --resume to continue it, or --name/--storage-path "
              "for a new one", file=sys.stderr)
        return 2
    from orchestrator.report import outbox, summary, tracking
    from orchestrator.report.callback import MLflowSearchCallback, journal_path

    problem = preflight(spec) or record_search_plan(spec, resume)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from orchestrator.report.study_report import commit_state

    clock = search_clock(spec).start(command or "", resume=resume, code=commit_state())
    cluster = init_ray(address)
    outbox.bound_http_requests()  # a dead tracking server costs seconds per call, not ~4 min of retries
    uri = tracking.resolve_tracking_uri(tracking_uri, spec.tracking.tracking_uri)
    exp_id = tracking.ensure_experiment(uri, spec.tracking.experiment)
    parent_id, reused = tracking.parent_run(uri, exp_id, exp_path, spec.name, reuse=resume)
    callback = None
    try:
        reference = cached_reference(spec)
        if not reused:
            summary.log_search_params(uri, parent_id, spec, reference, load_pools(spec).splits())
        # trials see the val reference only: their seesaw metrics are on val, like every other choice input
        callback = MLflowSearchCallback(uri, exp_id, parent_id, exp_path, spec, reference["val"],
                                        journal=journal_path(spec.storage_path, spec.name, uri),
                                        replay=resume)
        tuner, restored = build_tuner(spec, reference["val"], callback, concurrency(spec, cluster), resume)
        logger.info("%s search %s: %d trials, %d at a time; MLflow parent run %s", "resuming" if restored
                    else "starting", exp_path, spec.search.num_trials, concurrency(spec, cluster), parent_id)
        results = tuner.fit()
    except KeyboardInterrupt:
        close_on_abort(uri, parent_id, callback, "KILLED")
        raise
    except Exception as exc:
        close_on_abort(uri, parent_id, callback, "FAILED", tracking.failure_reason(str(exc)))
        raise
    rows = summary.trial_rows(results, spec)
    interrupted = results.num_terminated + results.num_errors < max(len(results), spec.search.num_trials)
    if not interrupted:  # choose on val first, then score test for the chosen trials only
        score_chosen_trials(spec, rows, uri, exp_id, parent_id)
    try:  # the report reads what the trials left; a fault in it must not leave the parent run open
        places = write_search_report(spec, rows, uri, parent_id, out_dir=out_dir, command=command,
                                     clock=clock.summary())
    except Exception as exc:  # noqa: BLE001 (any fault of a figure or a table: said, then the summary goes on)
        logger.exception("the search report was not written")
        print(f"warning: the search report was not written: {type(exc).__name__}: {exc}", file=sys.stderr)
        places = []
    text = summary.finish(uri, parent_id, spec, rows, storage.join(spec.storage_path, spec.name),
                          clock.summary()["running_s"], status="KILLED" if interrupted else "FINISHED")
    print(text)
    report_skipped(callback.skipped(), uri, parent_id)
    print(f"\nMLflow UI:  {tracking.ui_command(uri)}")
    print(f"then open:  {tracking.runs_url(uri, exp_id)}")
    if places:
        print("\nSearch report: " + ", ".join(f"{p}/report.md" for p in places))
    dashboards = dashboard_commands(spec)
    if dashboards:
        print("Optuna dashboard (pip install -e '.[dashboard]'), one study per method:\n  " + "\n  ".join(dashboards))
    if interrupted:
        print("\nThe search was interrupted; continue it with the same command plus --resume.", file=sys.stderr)
        return 130
    return 0 if any(r["status"] in ("TERMINATED", "STOPPED") for r in rows) else 1
