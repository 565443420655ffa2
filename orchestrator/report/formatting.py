"""Table cells of the study report (results.md): accuracies and differences in points, CIs, p-values, df."""

from __future__ import annotations

from orchestrator.evaluation.multiplicity import p_text  # the verdicts print p the same way

__all__ = ["cell", "ci_text", "delta_cell", "df_text", "p_text", "pct", "points"]


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def cell(iv: dict) -> str:
    low, high = iv["ci95"]
    return f"{pct(iv['mean'])} ± {100 * (high - low) / 2:.1f}"


def delta_cell(c: dict | None) -> str:
    if not c:
        return "-"
    return f"{100 * c['diff']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"


def ci_text(ci: list[float]) -> str:
    return f"[{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def df_text(df: float | None) -> str:
    return "-" if df is None else f"{df:.1f}"


def points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"
