"""Figures logged to MLflow (matplotlib, Agg backend): accuracy vs step, expert-by-task utilisation, Pareto front."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

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
    """Accuracy vs trainable parameters for every finished trial, coloured by method; the front joined."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows}):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["trainable_params"] for r in pts], [r[metric] for r in pts], s=40,
                   color=METHOD_COLORS.get(method), label=method, alpha=0.8)
    front = sorted((r for r in rows if r["trial_id"] in front_ids), key=lambda r: r["trainable_params"])
    if front:
        ax.plot([r["trainable_params"] for r in front], [r[metric] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"{metric} vs trainable parameters", fontsize=10)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
