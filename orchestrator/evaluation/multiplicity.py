"""Many tests, one family; equivalence only from an equivalence test.

- Holm (1979) step-down, family-wise error control (:func:`holm`): sort the m p-values ascending,
  ``p̃_(j) = max_{k <= j} min(1, (m − k + 1) · p_(k))``. Used across the study's pairwise method comparisons.
- Benjamini-Hochberg (1995) false discovery rate (:func:`benjamini_hochberg`): scipy's
  ``stats.false_discovery_control(method="bh")``. Used within a method's family of per-task tests (its per-task
  Δs against single-task, its seesaw flags), where a few false flags among many are tolerable but their share
  must be controlled.
- TOST (Schuirmann 1987, :func:`tost`): "A and B are equivalent within ±δ" only when both one-sided tests
  ``H0: Δ <= −δ`` and ``H0: Δ >= +δ`` reject at α, i.e. the 1 − 2α interval lies inside (−δ, δ); with the same t
  (SE and df) as the primary comparison: ``p = max(P(T_df > (Δ + δ)/se), P(T_df < (Δ − δ)/se))``.
  Otherwise a non-significant difference reads "not distinguishable; MDD x", never "level" or "equal".

NaN p-values (undetermined tests) stay NaN and do not count towards the family size m: nothing was tested there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats


def _finite(pvalues: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    p = np.array([np.nan if v is None else float(v) for v in pvalues], dtype=float)
    return p, np.flatnonzero(~np.isnan(p))


def holm(pvalues: Sequence[float | None]) -> list[float]:
    """Holm-adjusted p-values, in input order (module docstring); NaN / None stay NaN."""
    p, idx = _finite(pvalues)
    out = np.full(p.shape, np.nan)
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
        out[order] = np.maximum.accumulate(stepped)
    return out.tolist()


def benjamini_hochberg(pvalues: Sequence[float | None]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (scipy), in input order; NaN / None stay NaN."""
    p, idx = _finite(pvalues)
    out = np.full(p.shape, np.nan)
    if idx.size:
        out[idx] = stats.false_discovery_control(p[idx], method="bh")
    return out.tolist()


ADJUSTERS = {"holm": holm, "bh": benjamini_hochberg}


def adjust(pvalues: Mapping[str, float | None], method: str) -> dict[str, float | None]:
    """``{name: adjusted p}`` within one family (``method``: "holm" or "bh"); undetermined stay None."""
    names = list(pvalues)
    adjusted = ADJUSTERS[method]([pvalues[n] for n in names])
    return {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, adjusted)}


def tost(diff: float, se: float, df: float, margin: float, alpha: float = 0.05) -> dict:
    """Two one-sided tests of ``|Δ| < margin`` (module docstring): ``p``, ``equivalent`` (p < alpha), the
    ``1 − 2α`` interval it rests on, and the ``margin``. Undetermined (SE 0 or NaN df): p None, not equivalent."""
    if not (se > 0) or math.isnan(float(df)) or margin <= 0:
        return {"margin": margin, "p": None, "equivalent": False, "ci90": None, "alpha": alpha}
    p_low = float(stats.t.sf((diff + margin) / se, df))     # H0: Δ <= −margin
    p_high = float(stats.t.cdf((diff - margin) / se, df))   # H0: Δ >= +margin
    half = float(stats.t.ppf(1 - alpha, df)) * se
    p = max(p_low, p_high)
    return {"margin": margin, "p": p, "equivalent": bool(p < alpha), "ci90": [diff - half, diff + half],
            "alpha": alpha}


def p_text(p: float | None) -> str:
    """Three decimals; below 0.001 "< 0.001" (never "0.000", which reads as certainty); None "undetermined"."""
    if p is None:
        return "undetermined"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdict(diff: float, p_adjusted: float | None, equivalence: dict, mdd: float | None, alpha: float = 0.05,
            names: tuple[str, str] = ("A", "B")) -> str:
    """One phrase a report may print for the comparison ``a − b`` (``names``): "a > b", "a < b", "equivalent
    within ±δ", or "not distinguishable (MDD x)" / "undetermined". Differences in the accuracy scale (0.01 = 1
    point)."""
    if p_adjusted is None:
        return "undetermined (no spread between runs)"
    if p_adjusted < alpha:
        a, b = names
        return f"{a} > {b}" if diff > 0 else f"{a} < {b}"
    if equivalence.get("equivalent"):
        return f"equivalent within ±{100 * equivalence['margin']:.2g} points (TOST p {p_text(equivalence['p'])})"
    mdd_text = f"{100 * mdd:.2f} points" if mdd is not None and not math.isnan(mdd) else "unknown"
    return f"not distinguishable (MDD {mdd_text})"


def judge_comparisons(comparisons: list[dict], alpha: float = 0.05) -> None:
    """Holm across a family of comparisons, then each one's :func:`verdict`: sets ``p_holm`` and ``verdict`` on
    each dict, which holds ``diff``, ``p``, ``tost`` and ``mdd80``."""
    adjusted = adjust({i: c["p"] for i, c in enumerate(comparisons)}, "holm")
    for i, c in enumerate(comparisons):
        c["p_holm"] = adjusted[i]
        names = (c.get("a", "A"), c.get("b", "B"))
        c["verdict"] = verdict(c["diff"], c["p_holm"], c["tost"], c["mdd80"], alpha, names)
