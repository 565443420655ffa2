"""Search summary: one row per trial, the Pareto front of accuracy vs trainable parameters, tables.

Ray Tune has no Pareto API, so the front is computed here: trial a dominates b when it is at least as good on
every objective and strictly better on one; the front is the set of non-dominated finished trials.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

#: a trial row is val only (what every choice used); test is scored after choosing, for the chosen trials
COLUMNS = ("trial_id", "method", "status", "val/mean_acc", "best val/mean_acc", "trainable_params",
           "trainable_share", "step", "hparams", "error")


def dominates(a: dict, b: dict, objectives: dict[str, str]) -> bool:
    better = False
    for key, mode in objectives.items():
        x, y = (a[key], b[key]) if mode == "max" else (-a[key], -b[key])
        if x < y:
            return False
        better |= x > y
    return better


def pareto_front(rows: list[dict], objectives: dict[str, str]) -> list[dict]:
    """Non-dominated rows among those with finite values for every objective, sorted by the first objective."""
    ok = [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in objectives)]
    front = [r for r in ok if not any(dominates(o, r, objectives) for o in ok if o is not r)]
    first, mode = next(iter(objectives.items()))
    return sorted(front, key=lambda r: r[first], reverse=mode == "max")


def staircase(front: list[dict], x: str, y: str, x_mode: str = "min", y_mode: str = "max",
              x_end: float | None = None) -> tuple[list[float], list[float]]:
    """The attainment boundary of a two-objective front as (xs, ys) of a step line (matplotlib ``where="post"``).

    With ``x`` minimised and ``y`` maximised, the front sorted by increasing x has increasing y; the best y
    reachable at x is that of the last front point with x_i <= x, constant until the next point: a staircase,
    never the straight segments between points. ``x_end`` extends the last step to the right edge. Other modes
    flip the sign of their axis (sorted so that the step still goes along increasing "better" x).
    """
    sx, sy = (1 if x_mode == "min" else -1), (1 if y_mode == "max" else -1)
    pts = sorted(((r[x], r[y]) for r in front), key=lambda p: (sx * p[0], -sy * p[1]))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if pts and x_end is not None and sx * x_end > sx * xs[-1]:
        xs.append(x_end)
        ys.append(ys[-1])
    return xs, ys


def best_per_method(rows: list[dict], metric: str = "val/mean_acc", mode: str = "max") -> list[dict]:
    best: dict[str, dict] = {}
    for r in rows:
        v = r.get(metric)
        if not isinstance(v, (int, float)) or math.isnan(v):
            continue
        cur = best.get(r["method"])
        if cur is None or (v > cur[metric] if mode == "max" else v < cur[metric]):
            best[r["method"]] = r
    return [best[m] for m in sorted(best)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else (f"{value:.4f}" if abs(value) < 10 else f"{value:.0f}")
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def markdown_table(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path, columns: tuple[str, ...] = COLUMNS) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _fmt(r.get(c, "")) for c in columns})
    return path
