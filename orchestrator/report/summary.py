"""End of a search: one row per trial, best per method, Pareto front; written to storage, MLflow and the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orchestrator.report import pareto, plots, tracking
from orchestrator.spec.hparams import trial_hparams
from orchestrator.spec.space import SearchSpec


def log_search_params(uri: str, run_id: str, spec: SearchSpec, reference: dict[str, float]) -> None:
    """Parent run: the search's settings, the base model's zero-shot accuracy (ref/<task>) and the YAML file."""
    d, t, s = spec.data, spec.train, spec.search
    params = {"space": spec.source, "model": spec.model.name, "data": d.suite or ",".join(d.tasks),
              "train_limit": d.train_limit, "eval_limit": spec.eval.eval_limit, "max_length": d.max_length,
              "mixing": d.mixing, "template": d.template, "max_steps": t.max_steps, "epochs": t.epochs,
              "batch_size": t.batch_size, "grad_accum": t.grad_accum, "lr": t.lr, "schedule": t.schedule,
              "sampler": s.sampler, "num_trials": s.num_trials, "objectives": json.dumps(spec.objectives),
              "asha": s.asha.enabled, "methods": ",".join(m.kind for m in spec.methods),
              "workers_per_trial": spec.resources.workers_per_trial, "storage": f"{spec.storage_path}/{spec.name}"}
    metrics = {f"ref/{k}": v for k, v in reference.items()}
    finite = [v for v in reference.values() if not math.isnan(v)]
    if finite:
        metrics["ref/mean_acc"] = sum(finite) / len(finite)
    tracking.log_dict(uri, run_id, params=params, metrics=metrics)
    if spec.source and Path(spec.source).is_file():
        tracking.client(uri).log_artifact(run_id, spec.source, "space")


def trial_rows(results: Any, spec: SearchSpec) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ResultGrid (final values; best mean_acc over its evaluations)."""
    rows = []
    for res in results:
        m = dict(res.metrics or {})
        trial_id = m.get("trial_id") or Path(res.path).name.removeprefix("trial_")
        method, hp = trial_hparams(spec.methods, res.config or {})
        searched = {n for n, dom in spec.method(method).hparams if dom.kind != "const"}
        hp = {k: v for k, v in hp.items() if k in searched}  # constants are in MLflow params, not the table
        best = m.get(spec.metric, float("nan"))
        df = res.metrics_dataframe
        if df is not None and spec.metric in getattr(df, "columns", ()):
            best = float(df[spec.metric].max())
        status = "ERROR" if res.error else "TERMINATED"
        if status == "TERMINATED" and m.get("step", 0) < m.get("total_steps", 0):
            status = "STOPPED"  # ASHA
        rows.append({"trial_id": trial_id, "method": method, "status": status,
                     "mean_acc": m.get("mean_acc", float("nan")), "best_mean_acc": best,
                     "trainable_params": m.get("trainable_params", float("nan")),
                     "trainable_share": m.get("trainable_share", float("nan")), "step": m.get("step", 0),
                     "hparams": hp, "error": tracking.failure_reason(str(res.error)) if res.error else "",
                     **{k: v for k, v in m.items() if k.startswith("acc/")}})
    return sorted(rows, key=lambda r: (r["method"], r["trial_id"]))


def finish(uri: str, parent_id: str, spec: SearchSpec, rows: list[dict], out_dir: Path, wall_s: float,
           status: str = "FINISHED") -> str:
    """Write summary.csv/.md, pareto.json/.png to out_dir and the parent run; return the terminal summary."""
    objectives = spec.objectives if len(spec.objectives) > 1 else {spec.metric: spec.objectives[spec.metric],
                                                                    "trainable_params": "min"}
    ok = [r for r in rows if r["status"] != "ERROR"]
    front = pareto.pareto_front(ok, objectives)
    best = pareto.best_per_method(ok, spec.metric, spec.objectives[spec.metric])
    out_dir.mkdir(parents=True, exist_ok=True)
    pareto.write_csv(rows, out_dir / "summary.csv")
    cols = ("method", "trial_id", "mean_acc", "trainable_params", "trainable_share", "hparams")
    n_err = sum(r["status"] == "ERROR" for r in rows)
    text = "\n".join([
        f"\n== search {spec.name}: {len(rows)} trials ({n_err} failed) in {wall_s:.0f} s ==",
        "\nAll trials:", pareto.markdown_table(rows),
        "\nBest trial per method:", pareto.markdown_table(best, cols),
        f"\nPareto front ({', '.join(f'{k} {v}' for k, v in objectives.items())}):",
        pareto.markdown_table(front, cols)])
    (out_dir / "summary.md").write_text(text + "\n")
    (out_dir / "pareto.json").write_text(json.dumps(
        [{k: r[k] for k in ("trial_id", "method", spec.metric, "trainable_params", "hparams")} for r in front],
        indent=1, default=str))
    files = [out_dir / "summary.csv", out_dir / "summary.md", out_dir / "pareto.json"]
    if ok:
        files.append(plots.pareto_plot(ok, {r["trial_id"] for r in front}, out_dir / "pareto.png", spec.metric))
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
