"""The study's named secondary: the mean test accuracy without the tasks of ``study.secondary_without``.

Why a secondary: a task can carry the mean for a reason outside the question. In the LLM-Adapters BoolQ file the
passage is missing, so a BoolQ gain is the yes/no prior, not reading; the mean without it says what the other
tasks learned. It is reported beside the primary, never in its place, with the same statistics (seeds and items
random, ``orchestrator.evaluation.crossed``; TOST at the study's margin), and its pairwise comparisons are a
Holm family of their own. With the zero-shot model each left-out task's share of the mean's gain is given:

    share_t = (acc_t − zero_t) / T  /  (1/T Σ_u (acc_u − zero_u))     (accuracies averaged over seeds and items)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.evaluation import statistics as st
from orchestrator.evaluation.multiplicity import adjust, judge_comparisons, tost
from orchestrator.report.formatting import cell, ci_text, delta_cell, df_text, p_text, pct, points


def secondary_results(without: tuple[str, ...], tasks: list[str], X: dict[str, dict[str, np.ndarray]],
                      paired: dict[str, dict[str, np.ndarray]], ST: dict[str, np.ndarray],
                      zero: dict[str, np.ndarray], pairs: list[tuple[str, str]], *, n_boot: int,
                      margin: float) -> dict[str, Any]:
    """The secondary's numbers. ``X[m][t]``: method m's (seeds, items) 0/1 matrix on task t; ``paired[m][t]``: its
    rows at the single-task references' seeds; ``ST[t]``: the references' matrix (empty: none); ``zero[t]``: the
    zero-shot model's (items,) row (empty: none)."""
    kept = [t for t in tasks if t not in without]
    out: dict[str, Any] = {"without": list(without), "tasks": kept, "methods": {}, "comparisons": []}
    if zero:
        out["zero_shot_mean"] = float(np.mean([zero[t].mean() for t in kept]))
    for m, rows in X.items():
        entry: dict[str, Any] = {"mean": st.mean_over_tasks_interval({t: rows[t] for t in kept}).as_dict()}
        if ST:
            entry["delta_vs_single_task"] = st.compare({t: paired[m][t] for t in kept}, {t: ST[t] for t in kept},
                                                       n_boot=n_boot).as_dict()
        if zero:
            zs = {t: np.broadcast_to(zero[t], rows[t].shape) for t in kept}
            entry["delta_vs_zero_shot"] = st.compare({t: rows[t] for t in kept}, zs, n_boot=n_boot).as_dict()
            gain = {t: float(rows[t].mean() - zero[t].mean()) for t in tasks}
            total = sum(gain.values()) / len(tasks)
            entry["share_of_gain"] = {t: (gain[t] / len(tasks) / total if total else None) for t in without}
        out["methods"][m] = entry
    for key in ("delta_vs_single_task", "delta_vs_zero_shot"):   # Holm across the methods, as the primary's
        family = {m: e[key]["p"] for m, e in out["methods"].items() if e.get(key)}
        for m, p_holm in adjust(family, "holm").items():
            out["methods"][m][key]["p_holm"] = p_holm
    for a, b in pairs:
        c = st.compare({t: X[a][t] for t in kept}, {t: X[b][t] for t in kept}, n_boot=n_boot)
        out["comparisons"].append({"a": a, "b": b, **c.as_dict(), "tost": tost(c.diff, c.primary.se, c.primary.df,
                                                                                  margin)})
    judge_comparisons(out["comparisons"])
    return out


def secondary_markdown(sec: dict[str, Any], margin: float) -> list[str]:
    """The secondary's section of results.md: the means with their Δs, then the comparisons."""
    without = ", ".join(sec["without"])
    has_st = any(e.get("delta_vs_single_task") for e in sec["methods"].values())
    has_zs = "zero_shot_mean" in sec
    head = ["method", f"mean without {without}", *(["Δ vs single-task"] if has_st else []),
            *(["Δ vs zero-shot", f"{without}: share of the mean's gain over zero-shot"] if has_zs else [])]
    lines = [f"Named secondary (study.secondary_without): the mean over {', '.join(sec['tasks'])}, without "
             f"{without}; the same statistics as above, its comparisons a Holm family of their own. The primary "
             "stays the mean over every task.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m, e in sec["methods"].items():
        share = ", ".join(f"{t} {pct(v)} %" if v is not None else f"{t} -"
                          for t, v in (e.get("share_of_gain") or {}).items())
        lines.append("| " + " | ".join([m, cell(e["mean"]),
                                        *([delta_cell(e.get("delta_vs_single_task"))] if has_st else []),
                                        *([delta_cell(e.get("delta_vs_zero_shot")), share] if has_zs else [])])
                     + " |")
    if has_zs:
        lines.append("| " + " | ".join(["zero-shot", pct(sec["zero_shot_mean"]), *(["-"] if has_st else []),
                                        "0", "-"]) + " |")
    if sec["comparisons"]:
        lines += ["", f"| a − b (without {without}) | diff (points) | 95 % CI (seeds + items) | p | p Holm | df | "
                  f"MDD 80 % (points) | TOST p (±{100 * margin:.2g}) | verdict |", "|---" * 9 + "|"]
        lines += [f"| {c['a']} − {c['b']} | {100 * c['diff']:+.2f} | {ci_text(c['ci95'])} | {p_text(c['p'])} | "
                  f"{p_text(c.get('p_holm'))} | {df_text(c.get('df'))} | {points(c['mdd80'])} | "
                  f"{p_text((c.get('tost') or {}).get('p'))} | {c.get('verdict', '-')} |" for c in sec["comparisons"]]
    return [*lines, ""]
