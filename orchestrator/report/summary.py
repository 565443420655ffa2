"""End of a search: one row per trial, best per method, Pareto front; written to storage, MLflow and the terminal."""

from __future__ import annotations

import json
import math
import tempfile
import logging
from pathlib import Path
from typing import Any

from orchestrator.cluster import storage
from orchestrator.evaluation.metrics import mean_acc_history
from orchestrator.report import pareto, plots, tracking
from orchestrator.spec.hparams import trial_hparams
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


def log_search_params(uri: str, run_id: str, spec: SearchSpec, reference: dict[str, dict[str, float]],
                      splits: dict[str, dict] | None = None) -> None:
    """Parent run: the search's settings, its pools (``split/<task>/...`` params and ``splits.json``), the base
    model's zero-shot accuracy on val and test (``ref/val/acc/<task>``, ``ref/test/acc/<task>``) and the YAML."""
    d, t, s = spec.data, spec.train, spec.search
    params = {"space": spec.source, "model": spec.model.name, "data": d.suite or ",".join(d.tasks),
              "train_limit": d.train_limit, "val_limit": d.val_limit, "test_limit": d.test_limit,
              "split_seed": d.split_seed, "max_length": d.max_length,
              "mixing": d.mixing, "template": d.template, "formulation": d.formulation,
              "max_steps": t.max_steps, "epochs": t.epochs,
              "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": t.lr, "schedule": t.schedule,
              "sampler": s.sampler, "num_trials": s.num_trials, "objectives": json.dumps(spec.objectives),
              "asha": s.asha.enabled, "methods": ",".join(m.kind for m in spec.methods),
              "workers_per_trial": spec.resources.workers_per_trial, "storage": f"{spec.storage_path}/{spec.name}"}
    for task, record in (splits or {}).items():
        params.update({f"split/{task}/{k}": v for k, v in record.items()})
    metrics = {}
    for pool, accuracy in ((k, v) for k, v in reference.items() if k in ("val", "test")):
        scores = reference.get(f"{pool}_scores") or {t: {"acc": a} for t, a in accuracy.items()}  # acc/acc_norm/primary
        metrics.update({f"ref/{pool}/{m}/{t}": v for t, s in scores.items() for m, v in s.items() if v is not None})
        finite = [v for v in accuracy.values() if not math.isnan(v)]
        if finite:
            metrics[f"ref/{pool}/mean_acc"] = sum(finite) / len(finite)
    tracking.log_dict(uri, run_id, params=params, metrics=metrics)
    if spec.source and Path(spec.source).is_file():
        tracking.client(uri).log_artifact(run_id, spec.source, "space")
    if splits:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "splits.json").write_text(json.dumps(splits, indent=1, sort_keys=True))
            tracking.client(uri).log_artifact(run_id, str(Path(tmp) / "splits.json"))


def trial_rows(results: Any, spec: SearchSpec) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ResultGrid: final val values, the best val value over its evaluations, and its
    last checkpoint (the adapter scored on test if the trial is chosen, ``tuning.chosen``). Val only: a search
    trial scores no test items.

    status: TERMINATED (ran its whole budget), STOPPED (early-stopped by ASHA), ERROR.
    """
    rows = []
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or Path(res.path).name.removeprefix("trial_")
        config = res.config or {}
        if not config or ("method" not in config and len(spec.methods) > 1):
            # read just as it started, before Tune wrote its config: which method it trains is not known yet
            # (the first method would be a guess; spec.hparams.ConditionalSpace puts the method in every config)
            logger.warning("trial %s has no config yet (it had just started): left out of the table", trial_id)
            continue
        method, hp = trial_hparams(spec.methods, config)
        searched = {n for n, dom in spec.method(method).hparams if dom.kind != "const"}
        hp = {k: v for k, v in hp.items() if k in searched}  # constants are in MLflow params, not the table
        best = m.get(spec.metric, float("nan"))
        df, frame = res.metrics_dataframe, []
        if df is not None and spec.metric in getattr(df, "columns", ()):
            best = float(df[spec.metric].max())
        if df is not None and {"evaluations", "val/mean_acc"} <= set(getattr(df, "columns", ())):
            frame = df[["evaluations", "val/mean_acc"]].to_dict("records")
        # val mean accuracy after each evaluation (the report compares trials at one budget, an ASHA rung): the
        # frame's rows, then the last result, whose own list holds the evaluations a restart dropped from the frame
        history = mean_acc_history([*frame, m])
        status = "ERROR" if res.error else "TERMINATED"
        if status == "TERMINATED" and m.get("step", 0) < m.get("total_steps", 0):
            status = "STOPPED"  # ASHA
        rows.append({"trial_id": trial_id, "method": method, "status": status,
                     spec.metric: m.get(spec.metric, float("nan")), f"best {spec.metric}": best,
                     "val/mean_acc": m.get("val/mean_acc", float("nan")),
                     "trainable_params": m.get("trainable_params", float("nan")),
                     "trainable_share": m.get("trainable_share", float("nan")), "step": m.get("step", 0),
                     "hparams": hp, "error": tracking.failure_reason(str(res.error)) if res.error else "",
                     # the Train run's last checkpoint (forwarded by TuneReportCallback; the Tune trial has none)
                     "checkpoint": m.get("checkpoint_path") or (res.checkpoint.path if res.checkpoint else None),
                     # what the search report reads (report.search_report): speed, the rung, precision, per-task
                     # primary accuracy, per-item val answers and routing diagnostics where the trial logs them
                     **{k: m.get(k) for k in ("tokens_per_s", "evaluations", "precision", "eval_precision")},
                     "val_history": history,
                     **{k: v for k, v in m.items() if k.startswith(("val/acc/", "val/primary/", "val_correct/",
                                                                     "routing/mi"))}})
    return sorted(rows, key=lambda r: (r["method"], r["trial_id"]))


def choose(spec: SearchSpec, rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(best trial per method, Pareto front), chosen on val among the trials that ran their whole budget, each
    objective in its own mode; with one objective the front is over it and ``trainable_params`` (min)."""
    objectives = front_objectives(spec)
    complete = [r for r in rows if r["status"] == "TERMINATED"]
    return (pareto.best_per_method(complete, spec.metric, spec.objectives[spec.metric]),
            pareto.pareto_front(complete, objectives))


def front_objectives(spec: SearchSpec) -> dict[str, str]:
    return spec.objectives if len(spec.objectives) > 1 else {spec.metric: spec.objectives[spec.metric],
                                                             "trainable_params": "min"}


def budget_table(rows: list[dict]) -> str:
    """Per method: its trials, trainable parameters (range over its trials) and their share of the model."""
    out = []
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method and math.isfinite(r.get("trainable_params", math.nan))]
        counts = sorted({int(r["trainable_params"]) for r in mine})
        shares = sorted({r["trainable_share"] for r in mine})
        out.append({"method": method, "trials": sum(r["method"] == method for r in rows),
                    "trainable_params": "-".join(f"{c:,}" for c in (counts[:1] + counts[-1:] if len(counts) > 1
                                                                     else counts)) or "n/a",
                    "trainable_share": " - ".join(f"{100 * x:.2f} %" for x in (shares[:1] + shares[-1:]
                                                                                 if len(shares) > 1 else shares))})
    return pareto.markdown_table(out, ("method", "trials", "trainable_params", "trainable_share"))


def finish(uri: str, parent_id: str, spec: SearchSpec, rows: list[dict], out_dir: str | Path, wall_s: float,
           status: str = "FINISHED") -> str:
    """Write summary.csv/.md, pareto.json/.png to out_dir (a local folder or a URI) and the parent run; return the
    terminal summary. ``wall_s``: the search's running time over all its launches (``tuning.clock``).

    "Best per method" and the Pareto front are chosen on the validation objective (:func:`choose`); early-stopped
    trials are listed apart. Test accuracy appears only in those two tables, for the chosen trials, scored once
    after choosing (``tuning.chosen``); the table of all trials is val only.
    """
    objectives = front_objectives(spec)
    complete = [r for r in rows if r["status"] == "TERMINATED"]
    stopped = [r for r in rows if r["status"] == "STOPPED"]
    best, front = choose(spec, rows)
    columns = tuple(dict.fromkeys(("trial_id", "method", "status", spec.metric, *pareto.COLUMNS[3:])))
    cols = tuple(dict.fromkeys(("method", "trial_id", spec.metric, "val/mean_acc", "test/mean_acc",
                                "trainable_params", "trainable_share", "hparams")))
    n_err = sum(r["status"] == "ERROR" for r in rows)
    text = "\n".join([
        f"\n== search {spec.name}: {len(rows)} trials ({n_err} failed, {len(stopped)} early-stopped) in "
        f"{wall_s:.0f} s of running time ==",
        "\nTrials and trainable parameters per method (equal trials per method; share = of all parameters):",
        budget_table(rows),
        "\nAll trials (val only):", pareto.markdown_table(rows, columns),
        f"\nBest trial per method (chosen on val {spec.metric}; test scored once, after choosing, on the chosen "
        "trials only):",
        pareto.markdown_table(best, cols),
        f"\nPareto front of the completed trials ({', '.join(f'{k} {v}' for k, v in objectives.items())}):",
        pareto.markdown_table(front, cols),
        *(["\nEarly-stopped by ASHA (not eligible):", pareto.markdown_table(stopped, cols)] if stopped else [])])
    with storage.local_dir(out_dir) as local:  # a URI: written here, uploaded when the block ends
        pareto.write_csv(rows, local / "summary.csv", columns)
        (local / "summary.md").write_text(text + "\n")
        (local / "pareto.json").write_text(json.dumps(
            [{k: r.get(k) for k in ("trial_id", "method", spec.metric, "trainable_params", "hparams",
                                     "test/mean_acc")} for r in front],
            indent=1, default=str))
        files = [local / "summary.csv", local / "summary.md", local / "pareto.json"]
        if complete:
            files.append(plots.pareto_plot(complete, {r["trial_id"] for r in front}, local / "pareto.png",
                                           spec.metric))
        c = tracking.client(uri)
        for f in files:
            c.log_artifact(parent_id, str(f), "summary")
    metrics = {"trials_total": len(rows), "trials_failed": n_err, "search_wall_s": wall_s}
    if best:
        metrics[f"best_{spec.metric}"] = max(r[spec.metric] for r in best) if spec.objectives[spec.metric] == "max" \
            else min(r[spec.metric] for r in best)
    tracking.log_dict(uri, parent_id, metrics=metrics, tags={"malora.pareto_front": ",".join(
        r["trial_id"] for r in front)})
    c.set_terminated(parent_id, status)
    return text
