"""The search report's figures (``report.search_report``): Optuna's slice / contour per method, MALoRA's (d, β)
surface with the val noise, and the seesaw across trials. matplotlib, Agg backend (through ``report.plots``)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.report.plots import _save, plt

logger = logging.getLogger(__name__)


def method_plots(studies: dict[str, Any], folder: Path, target: str = "val/mean_acc") -> list[Path]:
    """Per method ``slice_<m>.png`` (val mean accuracy against each searched parameter) and, with two or more
    parameters, ``contour_<m>.png`` over its two most varied ones (``optuna.visualization.matplotlib``)."""
    import optuna

    out = []
    for method, study in studies.items():
        params = sorted({k for t in study.trials for k in t.params})
        if len(study.trials) < 2 or not params:
            continue
        with warnings.catch_warnings():  # the matplotlib backend is "experimental" (interface, not values)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = optuna.visualization.matplotlib.plot_slice(study, target_name=target)
            out.append(_save(np.ravel(ax)[0].figure, folder / f"slice_{method}.png"))
            spread = sorted(params, key=lambda p: -len({str(t.params.get(p)) for t in study.trials}))[:2]
            if len(spread) == 2:
                try:
                    ax = optuna.visualization.matplotlib.plot_contour(study, params=spread, target_name=target)
                    out.append(_save(np.ravel(ax)[0].figure, folder / f"contour_{method}.png"))
                except (ValueError, IndexError) as exc:  # e.g. one value per parameter: nothing to draw
                    logger.info("contour of %s not drawn: %s", method, exc)
                    plt.close("all")
    return out


SURFACE_MIN_POINTS = 6


def malora_surface(pts: list[tuple[float, float, float, str]], tie: dict | None, path: Path,
                   budget: int | None = None) -> Path | None:
    """MALoRA's trials ``(d, beta, val mean accuracy after budget evaluations, trial id)`` in the (d, β) plane,
    coloured by accuracy (a triangulated surface under them when ``SURFACE_MIN_POINTS`` or more span the plane:
    through three or four points a surface is a plane or two, a shape the data cannot show); the best completed
    trial (on its final val score) is starred and the trials within z·SE of it (its ties,
    ``report.search_report.ties``) ringed; the noise band z·SE is marked on the colour bar below the best value."""
    if not pts:
        return None
    d, beta, acc = (np.array([p[i] for p in pts], float) for i in range(3))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lo, hi = 100 * acc.min(), 100 * acc.max() + 1e-9
    if len(pts) >= SURFACE_MIN_POINTS and np.ptp(d) > 0 and np.ptp(beta) > 0 and np.linalg.matrix_rank(
            np.c_[d - d.mean(), beta - beta.mean()]) == 2:
        ax.tricontourf(d, beta, 100 * acc, levels=12, cmap="viridis", alpha=0.5, vmin=lo, vmax=hi)
    sc = ax.scatter(d, beta, c=100 * acc, cmap="viridis", vmin=lo, vmax=hi, s=60, edgecolors="k")
    bar = fig.colorbar(sc, ax=ax, label="val mean accuracy (%)")
    best = next((p for p in pts if tie and p[3] == tie["best"]), None)
    if best is not None:
        ax.scatter([best[0]], [best[1]], marker="*", s=260, color="red", edgecolors="k",
                   label="best (final val)", zorder=3)
        tied = [p for p in pts if p[3] in tie["ties"]]
        if tied:
            ax.scatter([p[0] for p in tied], [p[1] for p in tied], s=170, facecolors="none", edgecolors="red",
                       label="tied with it", zorder=3)
        ses = [o["se"] for o in tie["others"]]
        if ses:
            band = 100 * tie["z"] * float(np.median(ses))
            bar.ax.axhspan(100 * best[2] - band, 100 * best[2], color="red", alpha=0.35)
            ax.set_title(f"MALoRA val mean accuracy after {budget} evaluation(s) over (d, β)\nval noise: "
                         f"{tie['z']} x SE of a paired difference = {band:.1f} points (red band on the colour bar)",
                         fontsize=9)
        ax.legend(fontsize=7, loc="best")
    for x, y, a, _ in pts:
        ax.annotate(f"{100 * a:.1f}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for values, set_lim in ((d, ax.set_xlim), (beta, ax.set_ylim)):  # room for the labels: the surface's
        pad = 0.15 * np.ptp(values) or 0.1 * abs(values[0]) or 1.0    # extent would put points on the frame
        set_lim(values.min() - pad, values.max() + pad)
    ax.set_xlabel("d = λ·r·N (shared down-projection rank)")
    ax.set_ylabel("β")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def seesaw_plot(acc: np.ndarray, saw: dict[str, Any], path: Path) -> Path | None:
    """``acc``: (trials, tasks) val accuracies in [0, 1] (``saw["tasks"]`` order). Left: each task's accuracy
    against the trial's mean (one colour per task, its least-squares line); right: the Spearman rank correlation
    of the tasks' accuracies across trials (``report.search_report.seesaw``)."""
    tasks = saw["tasks"]
    if saw["spearman"] is None:
        return None
    acc = 100 * np.asarray(acc, float)
    mean = acc.mean(axis=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for j, t in enumerate(tasks):
        left.scatter(mean, acc[:, j], s=18, color=f"C{j}", label=f"{t} (slope {saw['slopes'][t]:.2f})")
        if np.ptp(mean) > 0:
            k, b = np.polyfit(mean, acc[:, j], 1)
            xs = np.array([mean.min(), mean.max()])
            left.plot(xs, k * xs + b, color=f"C{j}", lw=1)
    left.set_xlabel("trial's val mean accuracy (%)")
    left.set_ylabel("task's val accuracy (%)")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    rho = np.array(saw["spearman"], float)
    im = right.imshow(rho, cmap="RdBu", vmin=-1, vmax=1)
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            right.text(j, i, "–" if math.isnan(rho[i, j]) else f"{rho[i, j]:+.2f}", ha="center", va="center",
                       fontsize=8)
    right.grid(False)
    right.set_xticks(range(len(tasks)), tasks, rotation=30)
    right.set_yticks(range(len(tasks)), tasks)
    fig.colorbar(im, ax=right, label=f"Spearman ρ over {saw['trials']} trials")
    return _save(fig, path)
