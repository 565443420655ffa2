"""The study report's seesaw section: why a task gains or loses in multi-task training, per method over seeds.

Inputs are what each run reported at its final evaluation (``orchestrator.evaluation.diagnostics_record``: the
``diagnostics`` entry of its result). Per method (the multi-task replicates; single-task runs have one task and
no diagnostics) over its seeds:

* the task x task gradient cosine over all trainable tensors (``all``) and per parameter group: mean and sample
  standard deviation over the seeds of each cell (a cell that was NaN, a zero gradient, is left out of that cell);
* I(task; expert) (bits, and normalised by H(task)) by layer group: mean and standard deviation over the seeds;
* per task, its Δ vs the single-task reference next to its most conflicting partner: the task whose mean
  cosine with it (``all``) is the lowest, and that cosine. Whether the tasks that lose are the ones whose
  gradients pull the other way is summarised by Spearman's rank correlation between Δ and that cosine over every
  (method, task) row (n stated; with five tasks and four methods it is a description, not a test).

:func:`seesaw_over_training_plot` draws each task's val accuracy against steps for every method with its
single-task reference's final accuracy beside it (issue 31, item 3).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from orchestrator.evaluation.diagnostics_record import diagnostics_of  # noqa: E402
from orchestrator.report.diagnostic_plots import cosine_panel, save_figure  # noqa: E402
from orchestrator.report.plots import METHOD_COLORS  # noqa: E402


# ------------------------------------------------------------------------------------------ aggregation
def _run_view(run: Mapping[str, Any]) -> tuple[str, str, Any, dict]:
    """(role, method, seed, diagnostics record) of a run given either as ``{"method", "seed", "diagnostics"[,
    "role"]}`` or as a study's ``{"run": {role, method, seed, ...}, "metrics": final result}``."""
    if "run" in run:
        meta = run["run"]
        return meta.get("role", "replicate"), meta["method"], meta["seed"], diagnostics_of(run.get("metrics"))
    return run.get("role", "replicate"), run["method"], run["seed"], diagnostics_of(run)


def _spread(values: list[float]) -> dict[str, Any]:
    """{"mean", "sd" (sample, NaN below two values), "n"} of the finite values."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), "n": len(v)}


def _matrix_spread(matrices: list[list[list[float | None]]]) -> dict[str, Any]:
    stack = np.array([[[np.nan if x is None else x for x in row] for row in m] for m in matrices], dtype=float)
    cells = [[_spread(list(stack[:, i, j])) for j in range(stack.shape[2])] for i in range(stack.shape[1])]
    return {k: [[c[k] for c in row] for row in cells] for k in ("mean", "sd", "n")}


def method_diagnostics(records: list[dict], tasks: list[str]) -> dict[str, Any]:
    """One method's seeds (their diagnostics records) -> cosine matrices per group and routing I by layer group,
    each as mean / sd / n over the seeds, in ``tasks`` order."""
    cos: dict[str, list] = {}
    for rec in records:
        conflict = rec.get("grad_conflict") or {}
        order = conflict.get("tasks") or []
        if sorted(order) != sorted(tasks):
            continue
        idx = [order.index(t) for t in tasks]
        for group, m in (conflict.get("cos") or {}).items():
            cos.setdefault(group, []).append([[m[i][j] for j in idx] for i in idx])
    routing = [rec.get("routing") or {} for rec in records]
    groups = sorted({g for r in routing for g in r.get("mi_by_group", {})})
    return {
        "seeds": len(records),
        "grad_cos": {g: _matrix_spread(ms) for g, ms in sorted(cos.items())},
        "routing_mi": _spread([r["mi"] for r in routing if "mi" in r]),
        "routing_mi_norm": _spread([r["mi_norm"] for r in routing if "mi_norm" in r]),
        "routing_mi_by_group": {g: _spread([r["mi_by_group"][g] for r in routing if g in r.get("mi_by_group", {})])
                                for g in groups},
        "routing_mi_norm_by_group": {g: _spread([r["mi_norm_by_group"][g] for r in routing
                                                 if g in r.get("mi_norm_by_group", {})]) for g in groups},
    }


def conflict_rows(tasks: list[str], cos: dict[str, Any] | None, deltas: Mapping[str, float]) -> list[dict]:
    """Per task: its Δ vs single-task and its most conflicting partner (lowest mean cosine in ``all``)."""
    rows = []
    for i, task in enumerate(tasks):
        partner, value, sd = None, float("nan"), float("nan")
        if cos:
            means = [(cos["mean"][i][j], j) for j in range(len(tasks)) if j != i and math.isfinite(cos["mean"][i][j])]
            if means:
                value, j = min(means)
                partner, sd = tasks[j], cos["sd"][i][j]
        rows.append({"task": task, "delta": deltas.get(task, float("nan")), "partner": partner, "cos": value,
                     "cos_sd": sd})
    return rows


def _spearman(rows: list[dict]) -> dict[str, Any]:
    from scipy.stats import spearmanr

    pairs = [(r["delta"], r["cos"]) for r in rows if math.isfinite(r["delta"]) and math.isfinite(r["cos"])]
    if len(pairs) < 3:
        return {"rho": float("nan"), "n": len(pairs)}
    return {"rho": float(spearmanr(*zip(*pairs)).statistic), "n": len(pairs)}


# ------------------------------------------------------------------------------------------ the section
def seesaw_section(runs: list[dict], deltas_vs_single_task: dict[str, dict[str, float]], out: Path
                   ) -> tuple[dict[str, Any], str, list[Path]]:
    """(JSON-able results, markdown section, figures written into ``out``) of the study's seesaw diagnostics.

    ``runs``: every run of the study, each ``{"method", "seed", "diagnostics"[, "role"]}`` or the study's
    ``{"run": {...}, "metrics": final result}``; single-task runs and runs without diagnostics are skipped.
    ``deltas_vs_single_task``: method -> task -> Δ accuracy vs the single-task reference (fractions, as in
    results.json; shown in points). Returns ``({}, "", [])`` when no run has diagnostics.
    """
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        role, method, _, record = _run_view(run)
        if role != "single_task" and record:
            by_method.setdefault(method, []).append(record)
    if not by_method:
        return {}, "", []
    tasks = next(r["tasks"] for recs in by_method.values() for r in recs if r.get("tasks"))
    methods: dict[str, Any] = {}
    all_rows = []
    for method, records in by_method.items():
        entry = method_diagnostics(records, tasks)
        entry["conflict_table"] = conflict_rows(tasks, entry["grad_cos"].get("all"),
                                                deltas_vs_single_task.get(method, {}))
        all_rows += entry["conflict_table"]
        methods[method] = entry
    results = {"tasks": tasks, "methods": methods, "delta_vs_partner_cos_spearman": _spearman(all_rows)}
    out = Path(out)
    figures = [p for p in (cosine_panels(results, out / "seesaw_grad_cos.png"),
                           routing_mi_bars(results, out / "seesaw_routing_mi.png")) if p is not None]
    return results, seesaw_markdown(results, [p.name for p in figures]), figures


def _pm(s: dict[str, Any], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not math.isfinite(s["mean"]):
        return "–"
    sd = f" ± {fmt.format(scale * s['sd'])}" if math.isfinite(s["sd"]) else ""
    return fmt.format(scale * s["mean"]) + sd


def seesaw_markdown(results: dict[str, Any], figures: list[str]) -> str:
    """The section's text: per method the routing and conflict tables, then the Δ-vs-conflict summary."""
    tasks = results["tasks"]
    lines = ["## The seesaw: expert specialisation and gradient conflict", "",
             "At each run's final evaluation (mean ± sd over seeds): I(task; expert) in bits (0: every task routes "
             f"alike; H(task) = log2 {len(tasks)} = {math.log2(len(tasks)):.2f}: each task has experts of its own), "
             "and the cosine between the tasks' LM-loss gradients on fixed train probe items (−1: they pull the "
             "shared parameters in opposite directions).", ""]
    groups = sorted({g for e in results["methods"].values() for g in e["routing_mi_by_group"]})
    if groups:
        lines += ["| method | I(task; expert) | normalised | " + " | ".join(groups) + " |",
                  "|---" * (3 + len(groups)) + "|"]
        for m, e in results["methods"].items():
            if math.isfinite(e["routing_mi"]["mean"]):
                lines.append(f"| {m} | {_pm(e['routing_mi'], fmt='{:.3f}')} | {_pm(e['routing_mi_norm'])} | "
                             + " | ".join(_pm(e["routing_mi_by_group"].get(g, {"mean": float("nan")}), fmt="{:.3f}")
                                          for g in groups) + " |")
        lines.append("")
    for m, e in results["methods"].items():
        cos = e["grad_cos"].get("all")
        if cos:
            lines += [f"**{m}**: gradient cosine over all trainable tensors ({e['seeds']} seeds)", "",
                      "| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
            for i, t in enumerate(tasks):
                lines.append(f"| {t} | " + " | ".join(
                    "1" if i == j else _pm({"mean": cos["mean"][i][j], "sd": cos["sd"][i][j]})
                    for j in range(len(tasks))) + " |")
            lines.append("")
        lines += [f"| {m}: task | Δ vs single-task (points) | most conflicting partner | its cosine |",
                  "|---|---|---|---|"]
        for r in e["conflict_table"]:
            delta = f"{100 * r['delta']:+.1f}" if math.isfinite(r["delta"]) else "–"
            lines.append(f"| {r['task']} | {delta} | {r['partner'] or '–'} | "
                         f"{_pm({'mean': r['cos'], 'sd': r['cos_sd']})} |")
        lines.append("")
    s = results["delta_vs_partner_cos_spearman"]
    if math.isfinite(s["rho"]):
        lines += [f"Spearman's ρ between a task's Δ and its most conflicting partner's cosine: {s['rho']:+.2f} "
                  f"over {s['n']} (method, task) rows (positive: the tasks that lose are those with the most "
                  "opposed gradients; a description at this n, not a test).", ""]
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------ figures
def cosine_panels(results: dict[str, Any], path: Path) -> Path | None:
    """One task x task panel per method: the seed-mean gradient cosine over all trainable tensors."""
    methods = [m for m, e in results["methods"].items() if e["grad_cos"].get("all")]
    if not methods:
        return None
    tasks = results["tasks"]
    size = 0.6 * len(tasks) + 1.5
    fig, axes = plt.subplots(1, len(methods), figsize=(size * len(methods) + 1, size), squeeze=False)
    for ax, m in zip(axes[0], methods):
        grid = np.array(results["methods"][m]["grad_cos"]["all"]["mean"], dtype=float)
        im = cosine_panel(ax, grid, tasks, f"{m} ({results['methods'][m]['seeds']} seeds)", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label="gradient cosine (seed mean)")
    return save_figure(fig, path)


def routing_mi_bars(results: dict[str, Any], path: Path) -> Path | None:
    """I(task; expert) by layer group, one bar per method (seed mean, sd as error bar)."""
    methods = [m for m, e in results["methods"].items() if e["routing_mi_by_group"]]
    if not methods:
        return None
    groups = sorted({g for m in methods for g in results["methods"][m]["routing_mi_by_group"]})
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(1.5 + 1.4 * len(groups), 3.8))
    for k, m in enumerate(methods):
        cells = [results["methods"][m]["routing_mi_by_group"].get(g, {"mean": np.nan, "sd": np.nan}) for g in groups]
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [c["mean"] for c in cells], width, yerr=[np.nan_to_num(c["sd"]) for c in cells], capsize=3,
               label=m, color=METHOD_COLORS.get(m, "0.5"))
    ax.axhline(math.log2(len(results["tasks"])), color="black", ls="--", lw=1, label="H(task)")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("I(task; expert) (bits)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def history_of(reports: Iterable[Mapping[str, Any]], metric: str = "val/primary/") -> dict[str, list[tuple]]:
    """{task: [(step, accuracy), ...]} from a run's reported results in any order (dicts with ``step`` and
    ``<metric><task>``: Tune's per-report results, ``Result.metrics_dataframe.to_dict("records")``, or the
    checkpoints' metrics.json)."""
    out: dict[str, list[tuple]] = {}
    for r in reports:
        for key, value in r.items():
            if key.startswith(metric) and isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(key[len(metric):], []).append((int(r["step"]), float(value)))
    return {t: sorted(set(points)) for t, points in out.items()}


def seesaw_over_training_plot(histories: Mapping[str, Mapping[Any, Mapping[str, list[tuple]]]],
                              single_task_final: Mapping[str, float | list[float]], path: str | Path,
                              title: str = "Val accuracy over training; ◆ single-task reference at its end"
                              ) -> Path | None:
    """Each task's val accuracy against steps for every method, its single-task reference's final one beside it.

    ``histories``: method -> seed -> task -> [(step, accuracy)] (:func:`history_of` per run); the line is the
    mean over the seeds at each step (steps all seeds reported), the band their min-max. ``single_task_final``:
    task -> the single-task reference's final val accuracy (one value, or one per seed: mean drawn, min-max as
    an error bar), drawn as a diamond right of the last step and a dotted line across. One panel per task;
    accuracies as fractions, drawn in percent.
    """
    tasks = sorted({t for seeds in histories.values() for h in seeds.values() for t in h})
    if not tasks:
        return None
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks):
        last = 0
        for method, seeds in sorted(histories.items()):
            series = [dict(h[task]) for h in seeds.values() if h.get(task)]
            if not series:
                continue
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if not steps:
                continue
            values = np.array([[s[x] for x in steps] for s in series]) * 100      # (seeds, steps)
            color = METHOD_COLORS.get(method)
            ax.plot(steps, values.mean(0), marker="o", ms=3, color=color, label=method)
            if len(series) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)
            last = max(last, steps[-1])
        ref = single_task_final.get(task)
        if ref is not None:
            refs = np.atleast_1d(np.asarray(ref, dtype=float)) * 100
            x = last * 1.04 if last else 1
            ax.errorbar([x], [refs.mean()], yerr=[[refs.mean() - refs.min()], [refs.max() - refs.mean()]],
                        fmt="D", color="black", ms=6, capsize=3, label="single-task (end)")
            ax.axhline(refs.mean(), color="black", ls=":", lw=1)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel("val accuracy (%)", fontsize=8)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))   # the panels' x labels clear the titles of the row below
    return save_figure(fig, path)
