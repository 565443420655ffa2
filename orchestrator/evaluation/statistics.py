"""How sure a reported accuracy is: intervals, paired method comparisons, their power, and noise thresholds.

Notation: a method's test results for one task are a 0/1 matrix ``X`` of shape (S, I) -- S training seeds, I test
items, the same items for every seed and method (``orchestrator.data.pools``). Its accuracy is the grand mean;
with T tasks the headline is the mean over tasks.

- Per method, over seeds (S >= 2): the per-seed accuracies ``a_s`` give mean ``ā`` and the t-interval
  ``ā ± t_{1-α/2, S-1} · sd(a) / sqrt(S)`` (scipy's Student t), clipped to [0, 1]. One seed: the Wilson score
  interval of ``k`` correct out of ``I`` items (scipy ``binomtest``), the only noise left to state.
- Method comparison ``A − B`` (:func:`compare`), the primary test (``unit`` "seed+item", :func:`crossed_t`):
  seeds *and* items are random. The mean-over-tasks paired difference ``D`` is tested with the crossed seed x item
  variance of ``orchestrator.evaluation.crossed`` -- the per-seed t's variance plus the method x item
  interaction's -- against Student t with the effective df of that module (a critical value midway between
  Satterthwaite's and Cochran-Cox's). A simulation of the null with seed noise and a
  method x item interaction, in the study's regime, rejects at 3.4-5.9 % at nominal 5 % where the per-seed t
  rejects up to 49 % (``tests/orchestrator/evaluation/test_crossed.py``, ``benchmarks/stat_calibration.py``).
- Beside it, conditional on the scored items (:func:`seed_t`, ``unit`` "seed"): the per-seed paired differences
  ``d_s = (1/T) Σ_t (mean_i A_t[s, i] − mean_i B_t[s, i])`` (seeds paired by index, items by position) tested
  with t over seeds: ``d̄ ± t_{1-α/2, S-1} · sd(d)/sqrt(S)``. It answers "on these items"; with one seed the unit
  is the item (``se = sqrt(Σ_t var_i(d_t,i) / I_t) / T`` with ``Σ_t (I_t − 1)`` df), which is then also the primary.
  Every per-seed difference identical (SE 0) determines no p-value: ``p`` is NaN ("undetermined"), never 0.
- Beside them, the item-level paired bootstrap (:func:`item_bootstrap`): the seeds are kept, and each draw
  resamples the items of every task with replacement, the same items for every seed and both methods. It states
  how much the difference depends on which items were drawn, at these seeds; it ignores the seed noise.
- Minimum detectable difference at 80 % power (:func:`mdd80`): the true difference the two-sided 5 % primary
  test finds with probability 0.8, given its standard error ``se`` and ``df``:
  ``MDD = λ* · se`` where λ* solves ``P(|T'| > t_{1-α/2, df}) = 0.8`` for ``T'`` noncentral t with ``df`` degrees
  of freedom and noncentrality λ (scipy's ``nct``). λ* = 5.65 at df = 2 (S = 3), 2.80 for large df.
- Sizing a study (:func:`projected_mdd`): the MDD of the primary test at another design (S' seeds, I' items per
  task), from a pilot's variance components (``crossed.Components``: from its per-item answers, or
  ``crossed.components_from_summary`` of a reported seed SD and item-bootstrap SE), by the same variance model
  and critical-value rule as the test itself (``crossed.project_se``).
- Seesaw regressions (:func:`seesaw_regressions`): a task regresses only when its Δ against the reference is
  significantly negative in the one-sided primary test, at ``α₁ = Φ(−k)`` (k = ``noise_multiple``, 2: as rare as
  a 2-sigma normal drop, 2.3 %): ``Δ < −t_{1−α₁, df} · se``. Because the test is calibrated, pure noise gives
  ``T · Φ(−k)`` such regressions on average, which is reported beside the count; a Δ whose SE is 0 is
  "undetermined", not regressed. The report also adjusts the flags' one-sided p-values within the method's family
  of tasks (``orchestrator.evaluation.multiplicity``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

from orchestrator.evaluation.crossed import Components, crossed_se, project_se

CONFIDENCE = 0.95
POWER = 0.80
NOISE_MULTIPLE = 2.0  # k of the seesaw threshold: a drop counts only when as unlikely as a k-sigma normal one
SE_FLOOR = 1e-12      # accuracies are multiples of 1/I: a standard error below this is floating-point residue


@dataclass(frozen=True)
class Interval:
    """A mean with its ``confidence`` interval [low, high]; ``method`` is "t" (over seeds) or "wilson" (items)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def as_dict(self) -> dict:
        return {**asdict(self), "ci95": [self.low, self.high]}


def seed_interval(per_seed: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """t-interval of the mean of per-seed accuracies (S >= 2)."""
    a = np.asarray(per_seed, dtype=float)
    if a.size < 2:
        raise ValueError("a t-interval needs at least 2 seeds; use item_interval for one")
    mean, sem = float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))
    half = float(stats.t.ppf(0.5 + confidence / 2, a.size - 1)) * sem
    # an accuracy lies in [0, 1]: with few seeds the t-interval can reach past it, and is clipped there
    return Interval(mean, max(0.0, mean - half), min(1.0, mean + half), int(a.size), "t")


def item_interval(correct: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """Wilson score interval of ``correct`` out of ``n`` items (one seed)."""
    ci = stats.binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(correct / n, float(ci.low), float(ci.high), int(n), "wilson")


def accuracy_interval(x: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """The interval of one task's (S, I) 0/1 matrix: over seeds when S >= 2, else over items."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    if x.shape[0] >= 2:
        return seed_interval(x.mean(axis=1), confidence)
    return item_interval(int(x.sum()), x.shape[1], confidence)


def mean_over_tasks_interval(per_task: Mapping[str, np.ndarray], confidence: float = CONFIDENCE) -> Interval:
    """Interval of the mean-over-tasks accuracy: t over seeds of each seed's task mean, or (one seed) the Wilson
    interval of the pooled items -- equal task weights then differ from pooling only by the task sizes."""
    mats = [np.atleast_2d(np.asarray(m, dtype=float)) for m in per_task.values()]
    seeds = mats[0].shape[0]
    if seeds >= 2:
        return seed_interval(np.mean([m.mean(axis=1) for m in mats], axis=0), confidence)
    mean = float(np.mean([m.mean() for m in mats]))
    pooled = item_interval(int(sum(m.sum() for m in mats)), int(sum(m.shape[1] for m in mats)), confidence)
    half_low, half_high = pooled.mean - pooled.low, pooled.high - pooled.mean
    return Interval(mean, mean - half_low, mean + half_high, pooled.n, "wilson")


# ------------------------------------------------------------------------------------------ the t model
def t_test(d: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, np.ndarray]:
    """One-sample t-test of mean 0 over the last axis of ``d`` (..., n), vectorised over the leading axes.

    Returns arrays of shape (...): ``mean``, ``se`` = sd/sqrt(n), ``half`` (half-width of the two-sided
    ``confidence`` interval), ``p`` (two-sided) and the scalar ``df`` = n − 1. A zero ``se`` (every unit agrees
    exactly) gives p NaN: n identical units say nothing about the spread of a new one, so no p-value is claimed.
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    if n < 2:
        raise ValueError("a t-test needs at least 2 units (seeds or items)")
    mean, se = d.mean(axis=-1), d.std(axis=-1, ddof=1) / math.sqrt(n)
    return {"mean": mean, **_t_from(mean, se, n - 1, confidence)}


def _t_from(mean: np.ndarray, se: np.ndarray, df: float, confidence: float) -> dict[str, np.ndarray]:
    """``se`` (below ``SE_FLOOR``: 0), half-width and two-sided p of ``mean`` under Student t with ``df``; a zero
    ``se`` gives half-width 0 and p NaN (undetermined)."""
    mean = np.asarray(mean, dtype=float)
    se = np.asarray(se, dtype=float)
    se = np.where(se > SE_FLOOR, se, 0.0)   # rounding residue of identical differences (1e-19) is no spread
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(mean) / se
        p = np.where(se > 0, 2 * stats.t.sf(t, df), np.nan)
        half = np.where(se > 0, stats.t.ppf(0.5 + confidence / 2, df) * se, 0.0)
    return {"se": se, "half": half, "p": p, "df": df}


@dataclass(frozen=True)
class TTest:
    """A t-test of a paired difference: ``unit`` "seed+item" (the primary, seeds and items random: :func:`crossed_t`),
    "seed" (t over the per-seed differences, conditional on the items: :func:`seed_t`) or "item" (one seed).
    ``n`` units (seeds, or items), ``df`` degrees of freedom (the effective df, fractional, for "seed+item"),
    ``se`` the standard error. ``p`` NaN: undetermined (SE 0)."""

    mean: float
    low: float
    high: float
    p: float
    df: float
    se: float
    n: int
    unit: str

    @property
    def determined(self) -> bool:
        return self.se > 0 and not math.isnan(self.p)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "p": None if math.isnan(self.p) else self.p,
                "df": self.df, "se": self.se, "n": self.n, "unit": self.unit, "determined": self.determined}


def _paired(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Per task (sorted by name), the (S, I) paired differences ``A − B``; refuses unpaired inputs."""
    if set(a) != set(b):
        raise ValueError(f"paired comparison needs the same tasks, got {sorted(a)} and {sorted(b)}")
    out = []
    for t in sorted(a):
        ma, mb = np.atleast_2d(np.asarray(a[t], dtype=float)), np.atleast_2d(np.asarray(b[t], dtype=float))
        if ma.shape != mb.shape:
            raise ValueError(f"task {t}: unpaired shapes {ma.shape} and {mb.shape} (seeds x items)")
        out.append(ma - mb)
    if len({d.shape[0] for d in out}) != 1:
        raise ValueError(f"every task needs the same seeds, got {[d.shape[0] for d in out]} rows")
    return out


def per_seed_differences(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> np.ndarray:
    """``d_s`` = mean over tasks of the per-seed accuracy difference ``A − B``: shape (S,)."""
    return np.mean([d.mean(axis=1) for d in _paired(a, b)], axis=0)


def seed_t(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], confidence: float = CONFIDENCE) -> TTest:
    """``A − B`` conditional on the scored items (module docstring): t over seeds, or over items with one seed."""
    diffs = _paired(a, b)
    seeds = diffs[0].shape[0]
    if seeds >= 2:
        r = t_test(per_seed_differences(a, b), confidence)
        mean, n, unit = float(r["mean"]), seeds, "seed"
    else:
        items = [d[0] for d in diffs]
        if min(x.size for x in items) < 2:
            raise ValueError("a one-seed comparison needs at least 2 items per task")
        mean = float(np.mean([x.mean() for x in items]))
        se = math.sqrt(sum(x.var(ddof=1) / x.size for x in items)) / len(items)
        n, unit = sum(x.size for x in items), "item"
        r = _t_from(mean, se, n - len(items), confidence)
    half = float(r["half"])
    return TTest(mean, mean - half, mean + half, float(r["p"]), int(r["df"]), float(r["se"]), n, unit)


def crossed_t(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], confidence: float = CONFIDENCE) -> TTest:
    """The primary test of ``A − B``: seeds and items random (``orchestrator.evaluation.crossed``); with one seed
    the seed variance is not estimable and this is :func:`seed_t` over items."""
    diffs = _paired(a, b)
    if diffs[0].shape[0] < 2:
        return seed_t(a, b, confidence)
    mean, se, df, _ = crossed_se(diffs, confidence)
    r = _t_from(float(mean), float(se), float(df), confidence)
    mean, half = float(mean), float(r["half"])
    return TTest(mean, mean - half, mean + half, float(r["p"]), float(df), float(r["se"]),
                 int(diffs[0].shape[0] + sum(d.shape[1] for d in diffs)), "seed+item")


@functools.cache
def _noncentrality(df: float, power: float, confidence: float) -> float:
    """λ* with ``P(|T'_{df, λ*}| > t_{1-α/2, df}) = power`` (noncentral t, both tails)."""
    crit = stats.t.ppf(0.5 + confidence / 2, df)

    def shortfall(lam: float) -> float:  # lower tail by symmetry: P(T'_λ < −c) = P(T'_{−λ} > c)
        return float(stats.nct.sf(crit, df, lam) + stats.nct.sf(crit, df, -lam)) - power

    high = crit + 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10))


def mdd80(se: float, df: float, *, power: float = POWER, confidence: float = CONFIDENCE) -> float:
    """Minimum detectable difference of the two-sided t-test: ``λ* · se`` (module docstring); ``df`` may be
    fractional (the crossed test's effective df, rounded to 0.01 for the cache). NaN when ``se`` or ``df`` is undetermined."""
    if not (se > 0 and df > 0) or math.isnan(float(df)):
        return float("nan")
    return _noncentrality(min(round(float(df), 2), 1e6), power, confidence) * float(se)


def projected_mdd(components: Components, seeds: int, items_per_task: int, *, power: float = POWER) -> float:
    """MDD of the primary test at ``seeds`` seeds and ``items_per_task`` items from a pilot's ``components``."""
    se, df = project_se(components, seeds, items_per_task)
    return mdd80(se, df, power=power)


# ------------------------------------------------------------------------------------------ bootstrap
@dataclass(frozen=True)
class Bootstrap:
    """Item-level paired bootstrap of ``a − b``: observed difference, percentile CI, two-sided p, bootstrap SE."""

    diff: float
    low: float
    high: float
    p: float
    se: float
    n_boot: int

    def as_dict(self) -> dict:
        return {"diff": self.diff, "ci95": [self.low, self.high], "p": self.p, "se": self.se, "n_boot": self.n_boot}


def item_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, n_boot: int = 10_000,
                   seed: int = 0, confidence: float = CONFIDENCE) -> Bootstrap:
    """Paired bootstrap of the mean-over-tasks difference ``A − B`` over items, the seeds kept.

    Every draw resamples each task's items with replacement, the same items for every seed and both methods;
    since the draw is shared by the seeds, the resampled mean is the mean over resampled items of the per-item
    seed-averaged difference ``d̄_i = mean_s (A[s, i] − B[s, i])``. CI: the percentile interval; two-sided
    ``p = min(1, 2 · min(P*(d ≤ 0), P*(d ≥ 0)))`` with the +1 correction (Davison & Hinkley 1997, §4.4).
    """
    diffs = _paired(a, b)
    rng = np.random.default_rng(seed)
    draws = np.zeros(n_boot)
    for d in diffs:
        per_item = d.mean(axis=0)                                         # (I,) seed-averaged differences
        idx = rng.integers(0, per_item.size, size=(n_boot, per_item.size))
        draws += per_item[idx].mean(axis=1)                               # (n_boot,)
    draws /= len(diffs)
    observed = float(np.mean([d.mean() for d in diffs]))
    alpha = 1 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min((np.sum(draws <= 0) + 1) / (n_boot + 1), (np.sum(draws >= 0) + 1) / (n_boot + 1)))
    return Bootstrap(observed, float(low), float(high), float(p), float(draws.std(ddof=1)), n_boot)


# ------------------------------------------------------------------------------------------ comparison
@dataclass(frozen=True)
class Comparison:
    """``A − B``: the primary test (seeds and items random), the per-seed t conditional on the items and the item
    bootstrap beside it, and the primary test's MDD at 80 % power."""

    primary: TTest
    seed_t: TTest
    bootstrap: Bootstrap
    mdd80: float

    @property
    def diff(self) -> float:
        return self.primary.mean

    def as_dict(self) -> dict:
        """``diff``/``ci95``/``p``/``se``/``df`` repeat the primary test's, so that one reading is unambiguous."""
        t = self.primary
        return {"diff": t.mean, "ci95": [t.low, t.high], "p": None if math.isnan(t.p) else t.p, "se": t.se,
                "df": t.df, "determined": t.determined, "primary": t.unit, "crossed": t.as_dict(),
                "seed_t": {**self.seed_t.as_dict(), "conditional_on": "the scored items"},
                "bootstrap": self.bootstrap.as_dict(), "mdd80": None if math.isnan(self.mdd80) else self.mdd80}


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, n_boot: int = 10_000, seed: int = 0,
            confidence: float = CONFIDENCE) -> Comparison:
    """The paired comparison of ``A − B``; ``a[task]``, ``b[task]`` are (S, I_task) 0/1 matrices on the same
    items (columns) and seeds (rows, paired by index). One task is a plain per-task comparison."""
    primary = crossed_t(a, b, confidence)
    conditional = seed_t(a, b, confidence)
    boot = item_bootstrap(a, b, n_boot=n_boot, seed=seed, confidence=confidence)
    return Comparison(primary, conditional, boot, mdd80(primary.se, primary.df, confidence=confidence))


# ------------------------------------------------------------------------------------------ seesaw
def regression_threshold(se: np.ndarray | float, df: float, multiple: float = NOISE_MULTIPLE) -> np.ndarray:
    """The Δ below which a task counts as regressed: ``−t_{1−Φ(−k), df} · se`` (module docstring)."""
    return -float(stats.t.isf(stats.norm.cdf(-multiple), df)) * np.asarray(se, dtype=float)


def one_sided_p_below(test: TTest) -> float:
    """P-value of "Δ < 0" in ``test``'s t (``P(T_df < Δ / se)``); NaN when undetermined."""
    return float(stats.t.cdf(test.mean / test.se, test.df)) if test.determined else float("nan")


def seesaw_regressions(deltas: Mapping[str, Comparison], multiple: float = NOISE_MULTIPLE) -> dict:
    """Tasks whose Δ is significantly negative in the one-sided primary test at ``Φ(−multiple)``, how many pure
    noise would give on average (``T · Φ(−multiple)``), and the tasks whose Δ no test can judge (SE 0)."""
    alpha = float(stats.norm.cdf(-multiple))
    thresholds, regressed, undetermined = {}, [], []
    for t, c in deltas.items():
        if not c.primary.determined:
            undetermined.append(t)   # identical answers at every seed: no spread to measure a drop against
            continue
        thresholds[t] = float(regression_threshold(c.primary.se, c.primary.df, multiple))
        if c.primary.mean < thresholds[t]:
            regressed.append(t)
    return {"n_regressed_significant": len(regressed), "regressed": sorted(regressed),
            "undetermined": sorted(undetermined), "expected_by_noise": len(deltas) * alpha,
            "alpha_one_sided": alpha, "threshold": thresholds, "threshold_se_multiple": multiple,
            "p_one_sided": {t: one_sided_p_below(c.primary) for t, c in deltas.items()}}
