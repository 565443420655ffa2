"""Seesaw metrics: how unevenly multi-task training moves the tasks. Pure functions over ``{task: accuracy}``.

Notation: tasks ``t = 1..T``, current accuracy ``a_t``, reference accuracy ``r_t`` (the base model's zero-shot
score, single-task runs, or the previous evaluation), ``Δ_t = a_t - r_t``.

- mean Δ:        ``mean_Δ = (1/T) Σ_t Δ_t``
- min / max Δ:   ``min_t Δ_t`` (the worst-served task), ``max_t Δ_t``
- spread:        ``std_Δ = sqrt((1/T) Σ_t (Δ_t - mean_Δ)^2)`` (population standard deviation)
- regressions:   ``n_regressed = #{t : Δ_t < -tol}``;
                 ``n_regressed_while_improved = n_regressed if mean_Δ > tol else 0`` (the seesaw proper:
                 the average goes up while some tasks go down)
- opposite pairs over a sequence of evaluations ``a^(0), ..., a^(S)``: with step changes
  ``c_t^(s) = a_t^(s) - a_t^(s-1)``, the fraction of (unordered task pair, step) combinations whose changes
  have strictly opposite signs (``c_i c_j < 0`` with both ``|c| > tol``)::

      opp = Σ_{s=1..S} #{i<j : c_i^(s) c_j^(s) < 0} / (S · T(T-1)/2)

  0 when every task moves together, approaching 1/2 or more when training trades tasks against each other;
  defined as 0 with fewer than two evaluations or fewer than two tasks.

MALoRA (Table 1) and MoSLD (Table 1, Fig. 1) report the per-task Δ between multi-task and single-task
training; these scalars summarise that table so a search can log and optimise it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

TOL = 1e-9


def _check_same_tasks(current: Mapping[str, float], reference: Mapping[str, float]) -> None:
    missing, extra = set(current) - set(reference), set(reference) - set(current)
    if missing or extra:
        raise ValueError(f"current and reference must score the same tasks; only in current: {sorted(missing)}, "
                         f"only in reference: {sorted(extra)}")
    if not current:
        raise ValueError("no tasks to compare")


def task_deltas(current: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """``Δ_t = a_t - r_t`` for every task (both mappings must name the same tasks), in ``current``'s order."""
    _check_same_tasks(current, reference)
    return {t: float(current[t]) - float(reference[t]) for t in current}


def delta_summary(deltas: Mapping[str, float], *, tol: float = TOL) -> dict[str, float]:
    """mean, min, max, population std of Δ and the regression counts defined in the module docstring."""
    values = list(deltas.values())
    if not values:
        raise ValueError("no deltas to summarise")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    regressed = sum(v < -tol for v in values)
    return {
        "mean_delta": mean,
        "min_delta": min(values),
        "max_delta": max(values),
        "delta_std": std,
        "n_regressed": float(regressed),
        "n_regressed_while_improved": float(regressed if mean > tol else 0),
    }


def opposite_pair_fraction(history: Sequence[Mapping[str, float]], *, tol: float = TOL) -> float:
    """Fraction of (task pair, consecutive step) combinations moving in opposite directions (see module doc).

    Only tasks present in every evaluation of ``history`` count.
    """
    if len(history) < 2:
        return 0.0
    tasks = [t for t in history[0] if all(t in h for h in history)]
    n_pairs = len(tasks) * (len(tasks) - 1) // 2
    if n_pairs == 0:
        return 0.0
    opposite = 0
    for prev, cur in zip(history[:-1], history[1:]):
        signs = [0 if abs(d) <= tol else (1 if d > 0 else -1) for d in (cur[t] - prev[t] for t in tasks)]
        up, down = signs.count(1), signs.count(-1)
        opposite += up * down  # each (rising, falling) pair is one opposite pair
    return opposite / (n_pairs * (len(history) - 1))


def metric_key(name: str) -> str:
    """An MLflow-safe key part: letters, digits, ``_ - . /`` and spaces kept, anything else -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def seesaw_metrics(
    current: Mapping[str, float],
    reference: Mapping[str, float],
    history: Sequence[Mapping[str, float]] | None = None,
    *,
    tol: float = TOL,
) -> dict[str, float]:
    """Everything the orchestrator logs, as a flat dict of floats with stable keys.

    Keys: ``seesaw/mean_acc``, ``seesaw/min_acc``, ``seesaw/mean_delta``, ``seesaw/min_delta``,
    ``seesaw/max_delta``, ``seesaw/delta_std``, ``seesaw/n_regressed``, ``seesaw/n_regressed_while_improved``,
    ``seesaw/opposite_pair_frac`` (from ``history``, the earlier evaluations in order, to which ``current`` is
    appended; 0 without history) and ``delta/<task>`` per task.
    """
    deltas = task_deltas(current, reference)
    out = {"seesaw/mean_acc": sum(map(float, current.values())) / len(current),
           "seesaw/min_acc": float(min(current.values()))}
    out.update({f"seesaw/{k}": v for k, v in delta_summary(deltas, tol=tol).items()})
    steps = [*history, current] if history else []
    out["seesaw/opposite_pair_frac"] = opposite_pair_fraction(steps, tol=tol)
    out.update({f"delta/{metric_key(t)}": d for t, d in deltas.items()})
    return out
