"""Figures of a trial's seesaw diagnostics (``orchestrator.evaluation.diagnostics_record``) at its final evaluation:
the task x task gradient cosines per parameter group, I(task; expert) per routed layer, and the task x expert shares
of the most and least specialised layers. Logged to the trial's MLflow run under ``plots/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")   # not tight_layout: it refuses a colorbar over many panels
    plt.close(fig)
    return path


def _grid(matrix) -> np.ndarray:
    """(T, T) float array of a nested list (None: NaN) or an array."""
    return np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)


def cosine_panel(ax, grid: np.ndarray, tasks: list[str], title: str, fontsize: int = 6):
    """One task x task cosine panel on ``ax`` (blue: aligned, red: pulling apart), off-diagonal cells annotated;
    returns the image (for a colorbar)."""
    im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            if i != j and np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:+.2f}", ha="center", va="center", fontsize=fontsize)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=fontsize, rotation=45, ha="right")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize + 2)
    return im


def cosine_heatmaps(cos: dict[str, Any], tasks: list[str], path: str | Path, title: str) -> Path | None:
    """One task x task panel per parameter group (``all`` first), cosine in [-1, 1] (blue: pulling apart), each
    cell annotated; ``cos[group]`` a (T, T) nested list (None: zero gradient) or array."""
    groups = sorted(cos, key=lambda g: (g != "all", g))
    if not groups:
        return None
    cols = min(4, len(groups))
    rows = math.ceil(len(groups) / cols)
    size = 0.55 * len(tasks) + 1.4
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 0.8, size * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, group in zip(axes.flat, groups):
        im = cosine_panel(ax, _grid(cos[group]), tasks, group)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="gradient cosine")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _layer_and_module(name: str) -> tuple[int, str]:
    """(decoder-layer index: the first integer path component, -1 without one; the module's own name)."""
    return next((int(p) for p in name.split(".") if p.isdigit()), -1), name.rsplit(".", 1)[-1]


def mi_by_layer_plot(mi_by_layer: dict[str, float], num_tasks: int, path: str | Path, title: str) -> Path | None:
    """I(task; expert) (bits) against the decoder-layer index, one line per adapted module (``q_proj``, ...);
    dashed at H(task) = log2 T, what a router that gives each task experts of its own reaches."""
    if not mi_by_layer:
        return None
    lines: dict[str, list[tuple[int, float]]] = {}
    for name, value in mi_by_layer.items():
        index, module = _layer_and_module(name)
        lines.setdefault(module, []).append((index, value))
    fig, ax = plt.subplots(figsize=(7, 4))
    for module, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=module)
    if num_tasks > 1:
        ax.axhline(math.log2(num_tasks), color="black", ls="--", lw=1, label="H(task)")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("I(task; expert) (bits)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def specialisation_matrices(routing: dict[str, Any], tasks: list[str], path: str | Path, title: str) -> Path | None:
    """Task x expert shares p(e | t) of the most and the least specialised layer (``routing["most"]`` and
    ``routing["least"]``: layer, mi, share)."""
    panels = [(k, routing[k]) for k in ("most", "least") if routing.get(k)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.8, 0.45 * len(tasks) + 1.8),
                             squeeze=False)
    for ax, (kind, layer) in zip(axes[0], panels):
        grid = np.array(layer["share"], dtype=float)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [f"e{i}" for i in range(grid.shape[1])], fontsize=7)
        ax.set_title(f"{kind} specialised: {layer['layer']}\nI = {layer['mi']:.3f} bits", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, label="p(expert | task)")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def diagnostics_plots(record: dict[str, Any], folder: Path, label: str) -> list[Path]:
    """Every figure a final diagnostics record gives (none for what it lacks), written into ``folder``."""
    tasks = record.get("tasks") or []
    routing, conflict = record.get("routing") or {}, record.get("grad_conflict") or {}
    made = [
        cosine_heatmaps(conflict.get("cos") or {}, conflict.get("tasks") or tasks, folder / "grad_conflict.png",
                        f"{label}: task x task gradient cosine per parameter group (final evaluation)"),
        mi_by_layer_plot(routing.get("mi_by_layer") or {}, len(tasks), folder / "routing_mi_by_layer.png",
                         f"{label}: I(task; expert) per routed layer (final evaluation)"),
        specialisation_matrices(routing, tasks, folder / "routing_extremes.png",
                                f"{label}: task x expert shares, most and least specialised layers"),
    ]
    return [p for p in made if p is not None]
