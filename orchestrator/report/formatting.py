"""Table cells of the study report (results.md): accuracies and differences in points, CIs, p-values, df."""

from __future__ import annotations


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


def p_text(p: float | None) -> str:
    """Three decimals; below 0.001 "< 0.001" (never "0.000", which reads as certainty); None "undetermined"."""
    if p is None:
        return "undetermined"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def df_text(df: float | None) -> str:
    return "-" if df is None else f"{df:.1f}"


def points(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"
