"""Figures logged to MLflow (matplotlib, Agg backend): accuracy vs step, expert-by-task utilisation, Pareto front."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHOD_COLORS = {"lora": "tab:blue", "molora": "tab:orange", "malora": "tab:red", "mosld": "tab:green",
                 "hydra": "tab:purple"}


def accuracy_plot(history: dict[str, list[tuple[int, float]]], reference: dict[str, float] | None,
                  path: str | Path, title: str) -> Path:
    """One line per task (accuracy vs optimizer step), dashed at the base model's zero-shot accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (task, points) in enumerate(sorted(history.items())):
        color = "black" if task == "mean_acc" else f"C{i % 10}"
        steps, values = zip(*sorted(points)) if points else ((), ())
        ax.plot(steps, values, marker="o", color=color, lw=2.5 if task == "mean_acc" else 1.5, label=task)
        ref = (reference or {}).get(task)
        if ref is None and task == "mean_acc" and reference:
            ref = sum(reference.values()) / len(reference)
        if ref is not None and not math.isnan(ref):
            ax.axhline(ref, color=color, ls="--", lw=1, alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("accuracy (dashed: base model zero-shot)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def utilisation_heatmap(util: dict[str, dict[str, list[float]]], path: str | Path, title: str) -> Path | None:
    """util[group][task] = share of token-slots per expert; one tasks x experts panel per layer group."""
    groups = sorted(util)
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 0.45 * max(
        len(util[g]) for g in groups) + 1.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        tasks = sorted(util[group])
        matrix = [util[group][t] for t in tasks]
        im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xticks(range(len(matrix[0])), [f"e{i}" for i in range(len(matrix[0]))], fontsize=7)
        ax.set_title(group, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def pareto_plot(rows: list[dict], front_ids: set[str], path: str | Path, metric: str = "val/mean_acc") -> Path:
    """Accuracy vs trainable parameters for every trial given, coloured by method (hollow: not on the front;
    a triangle: stopped early by ASHA, so its value is at an earlier rung than the others'); the front (``metric``
    max, trainable parameters min) as the staircase of what each budget attains."""
    from matplotlib.lines import Line2D

    from orchestrator.report.pareto import staircase

    fig, ax = plt.subplots(figsize=(7, 4.5))
    handles = []
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        color = METHOD_COLORS.get(method, "0.4")
        for on in (True, False):
            for stopped in (False, True):
                mine = [r for r in pts if (r["trial_id"] in front_ids) == on and (r.get("status") == "STOPPED")
                        == stopped]
                if mine:
                    ax.scatter([r["trainable_params"] for r in mine], [r[metric] for r in mine], s=40, alpha=0.85,
                               marker="v" if stopped else "o", facecolors=color if on else "none", edgecolors=color)
        handles.append(Line2D([], [], ls="", marker="o", color=color, label=method))
    handles += [Line2D([], [], ls="", marker="o", mfc="none", color="0.4", label="not on the front"),
                Line2D([], [], ls="", marker="v", mfc="none", color="0.4", label="stopped early (val at its rung)")]
    front = [r for r in rows if r["trial_id"] in front_ids]
    if front:
        xs, ys = staircase(front, "trainable_params", metric, x_end=max(r["trainable_params"] for r in rows))
        handles += ax.step(xs, ys, where="post", color="k", ls="--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7)
    ax.set_title(f"{metric} vs trainable parameters", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ study
def _err(iv: dict) -> tuple[float, float]:
    """(lower, upper) error-bar lengths in points from an interval dict with ``mean`` and ``ci95``."""
    return 100 * (iv["mean"] - iv["ci95"][0]), 100 * (iv["ci95"][1] - iv["mean"])


def study_accuracy_plot(results: dict, path: str | Path) -> Path:
    """Grouped bars: test accuracy per task and method with 95 % CI bars; single-task and zero-shot marked."""
    tasks, methods = list(results["split"]), list(results["methods"])
    groups = methods + (["single-task"] if results["single_task"] else [])
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(tasks), 4.2))
    for j, name in enumerate(groups):
        cells = results["single_task"] if name == "single-task" else results["methods"][name]["per_task"]
        xs = [i + (j - (len(groups) - 1) / 2) * width for i in range(len(tasks))]
        ys = [100 * cells[t]["mean"] for t in tasks]
        errs = np.array([_err(cells[t]) for t in tasks]).T
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=name, color=METHOD_COLORS.get(name, "0.6"))
    for i, t in enumerate(tasks):
        if t in results["zero_shot"]:
            ax.hlines(100 * results["zero_shot"][t], i - 0.45, i + 0.45, colors="black", linestyles="--", lw=1)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy (%) · 95 % CI · dashed: zero-shot")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(groups))
    return _save(fig, path)


def study_delta_heatmap(results: dict, path: str | Path) -> Path:
    """Methods x tasks: Δ test accuracy vs the single-task reference (points); '*' where the CI excludes 0."""
    tasks, methods = list(results["split"]), list(results["methods"])
    grid = np.array([[100 * results["methods"][m]["per_task"][t]["delta_vs_single_task"]["diff"] for t in tasks]
                     for m in methods])
    lim = max(1.0, float(np.abs(grid).max()))
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(tasks), 1.2 + 0.6 * len(methods)))
    im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i, m in enumerate(methods):
        for j, t in enumerate(tasks):
            lo, hi = results["methods"][m]["per_task"][t]["delta_vs_single_task"]["ci95"]
            ax.text(j, i, f"{grid[i, j]:+.1f}{'*' if lo > 0 or hi < 0 else ''}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(methods)), methods)
    fig.colorbar(im, ax=ax, label="Δ vs single-task (points)")
    return _save(fig, path)


def study_accuracy_vs_params(results: dict, path: str | Path) -> Path:
    """Mean test accuracy (95 % CI) against trainable parameters, one point per method."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, e in results["methods"].items():
        lo, hi = _err(e["mean"])
        ax.errorbar(e["trainable_params"], 100 * e["mean"]["mean"], yerr=[[lo], [hi]], fmt="o", capsize=4,
                    color=METHOD_COLORS.get(m, "0.3"), label=m)
    if results["zero_shot"]:
        z = results["zero_shot"]
        ax.axhline(100 * sum(z.values()) / len(z), color="black", ls="--", lw=1, label="zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("mean test accuracy (%) · 95 % CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
