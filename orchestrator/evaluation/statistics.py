"""How sure a reported accuracy is: intervals, paired method comparisons, their power, and noise thresholds.

Notation: a method's test results for one task are a 0/1 matrix ``X`` of shape (S, I) -- S training seeds, I test
items, the same items for every seed and method (``orchestrator.data.pools``). Its accuracy is the grand mean;
with T tasks the headline is the mean over tasks.

- Per method, over seeds (S >= 2): the per-seed accuracies ``a_s`` give mean ``ā`` and the t-interval
  ``ā ± t_{1-α/2, S-1} · sd(a) / sqrt(S)`` (scipy's Student t), clipped to [0, 1]. One seed: the Wilson score
  interval of ``k`` correct out of ``I`` items (scipy ``binomtest``), the only noise left to state.
- Method comparison ``A − B`` (:func:`compare`), the primary test: with few seeds the seed is the unit. The
  per-seed paired differences ``d_s = (1/T) Σ_t (mean_i A_t[s, i] − mean_i B_t[s, i])`` (seeds paired by index,
  items by position) are tested with t over seeds: ``d̄ ± t_{1-α/2, S-1} · sd(d)/sqrt(S)``, two-sided
  ``p = 2 · P(T_{S-1} > |d̄| / se)`` -- the same t with S−1 df as the per-method interval, so the two agree.
  With one seed the unit is the item: ``se = sqrt(Σ_t var_i(d_t,i) / I_t) / T`` with ``Σ_t (I_t − 1)`` df.
  A simulation of the null at S = 3 and 500 items (two equal methods, seed SD 0, 2 and 4 points) rejects at
  the nominal 5 % (``tests/orchestrator/evaluation/test_statistics.py``); the joint seed+item bootstrap this
  replaced rejected 0.4 %, 3.1 % and 8.4 % there (``benchmarks/stat_calibration.py``): with 3 seeds there are
  10 distinct seed multisets, and resampling them shrinks the between-seed variance by (S−1)/S.
- Beside it, the item-level paired bootstrap (:func:`item_bootstrap`): the seeds are kept, and each draw
  resamples the items of every task with replacement, the same items for every seed and both methods. It states
  how much the difference depends on which items were drawn, at these seeds; it ignores the seed noise, so it is
  not the test (it rejects too often when seeds matter).
- Minimum detectable difference at 80 % power (:func:`mdd80`): the true difference the two-sided 5 % t-test
  above finds with probability 0.8, given its standard error ``se = sd(d)/sqrt(S)`` and ``df``:
  ``MDD = λ* · se`` where λ* solves ``P(|T'| > t_{1-α/2, df}) = 0.8`` for ``T'`` noncentral t with ``df`` degrees
  of freedom and noncentrality λ (scipy's ``nct``). λ* = 5.65 at df = 2 (S = 3), 2.80 for large df.
- Sizing from a pilot (:func:`change_rate_mdd`, :func:`items_for_mdd`): if a share ``q`` of the pooled test items
  changes correctness between two runs, each changed item moving a run's accuracy by ±1/I in a balanced direction,
  then ``Var(a_s − a_s') = q / I`` and one run's between-seed variance is ``q / (2I)``. A Δ against a fixed
  reference (the zero-shot model) has ``sd(d) = sqrt(q / (2I))``, a difference of two trained methods
  ``sqrt(q / I)``; with S seeds ``se = sd / sqrt(S)`` and the MDD is ``λ*_{S−1} · se``, so the pooled items needed
  for a target MDD ``δ`` are ``I = q · λ*² / (k · S · δ²)`` (k = 2 against a fixed reference, 1 between methods).
- Seesaw regressions (:func:`seesaw_regressions`): a task regresses only when its Δ against the reference is
  significantly negative in the one-sided t-test of the same model, at ``α₁ = Φ(−k)`` (k = ``noise_multiple``, 2:
  as rare as a 2-sigma normal drop, 2.3 %): ``Δ < −t_{1−α₁, df} · se``. Because the test is calibrated, pure
  noise gives ``T · Φ(−k)`` such regressions on average, which is reported beside the count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
POWER = 0.80
NOISE_MULTIPLE = 2.0  # k of the seesaw threshold: a drop counts only when as unlikely as a k-sigma normal one


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
    ``confidence`` interval), ``p`` (two-sided) and the scalar ``df`` = n − 1. A zero ``se`` gives p = 1 when the
    mean is 0 and p = 0 otherwise (every unit agrees exactly).
    """
    d = np.asarray(d, dtype=float)
    n = d.shape[-1]
    if n < 2:
        raise ValueError("a t-test needs at least 2 units (seeds or items)")
    mean, se = d.mean(axis=-1), d.std(axis=-1, ddof=1) / math.sqrt(n)
    return {"mean": mean, "se": se, **_t_from(mean, se, n - 1, confidence)}


def _t_from(mean: np.ndarray, se: np.ndarray, df: float, confidence: float) -> dict[str, np.ndarray]:
    """Half-width and two-sided p of ``mean`` with standard error ``se`` under Student t with ``df``."""
    mean, se = np.asarray(mean, dtype=float), np.asarray(se, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(mean) / se
    p = np.where(se > 0, 2 * stats.t.sf(t, df), np.where(mean == 0, 1.0, 0.0))
    return {"half": float(stats.t.ppf(0.5 + confidence / 2, df)) * se, "p": p, "df": df}


@dataclass(frozen=True)
class TTest:
    """The primary comparison: t over seeds of the per-seed paired differences (``unit`` "seed"), or over items
    with one seed (``unit`` "item"). ``n`` units, ``df`` degrees of freedom, ``se`` the standard error."""

    mean: float
    low: float
    high: float
    p: float
    df: int
    se: float
    n: int
    unit: str

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "p": self.p, "df": self.df, "se": self.se,
                "n": self.n, "unit": self.unit}


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
    """The primary test of ``A − B`` (module docstring): t over seeds, or over items with one seed."""
    diffs = _paired(a, b)
    seeds = diffs[0].shape[0]
    if seeds >= 2:
        r = t_test(per_seed_differences(a, b), confidence)
        mean, se, n, unit = float(r["mean"]), float(r["se"]), seeds, "seed"
    else:
        items = [d[0] for d in diffs]
        if min(x.size for x in items) < 2:
            raise ValueError("a one-seed comparison needs at least 2 items per task")
        mean = float(np.mean([x.mean() for x in items]))
        se = math.sqrt(sum(x.var(ddof=1) / x.size for x in items)) / len(items)
        n, unit = sum(x.size for x in items), "item"
        r = _t_from(mean, se, n - len(items), confidence)
    half = float(r["half"])
    return TTest(mean, mean - half, mean + half, float(r["p"]), int(r["df"]), se, n, unit)


@functools.cache
def _noncentrality(df: int, power: float, confidence: float) -> float:
    """λ* with ``P(|T'_{df, λ*}| > t_{1-α/2, df}) = power`` (noncentral t, both tails)."""
    crit = stats.t.ppf(0.5 + confidence / 2, df)

    def shortfall(lam: float) -> float:  # lower tail by symmetry: P(T'_λ < −c) = P(T'_{−λ} > c)
        return float(stats.nct.sf(crit, df, lam) + stats.nct.sf(crit, df, -lam)) - power

    high = crit + 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10))


def mdd80(se: float, df: int, *, power: float = POWER, confidence: float = CONFIDENCE) -> float:
    """Minimum detectable difference of the two-sided t-test: ``λ* · se`` (module docstring)."""
    return _noncentrality(int(df), power, confidence) * float(se)


def change_rate_mdd(change_rate: float, items: int, seeds: int, *, vs_fixed: bool, power: float = POWER,
                    confidence: float = CONFIDENCE) -> float:
    """MDD of the t-test over ``seeds`` seeds on ``items`` pooled test items when a share ``change_rate`` of items
    changes correctness between runs (module docstring); ``vs_fixed``: against a fixed reference (zero-shot)."""
    if seeds < 2:
        raise ValueError("the t-test over seeds needs at least 2 seeds")
    variance = change_rate / (2 * items) * (1 if vs_fixed else 2)   # of one per-seed difference d_s
    return mdd80(math.sqrt(variance / seeds), seeds - 1, power=power, confidence=confidence)


def items_for_mdd(delta: float, change_rate: float, seeds: int, *, vs_fixed: bool, power: float = POWER,
                  confidence: float = CONFIDENCE) -> int:
    """Smallest pooled test-item count whose :func:`change_rate_mdd` is at most ``delta``."""
    if seeds < 2:
        raise ValueError("the t-test over seeds needs at least 2 seeds")
    lam = _noncentrality(seeds - 1, power, confidence)
    return max(1, math.ceil(change_rate * lam ** 2 / ((2 if vs_fixed else 1) * seeds * delta ** 2) - 1e-9))


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
    """``A − B``: the primary t-test, the item bootstrap beside it, and the test's MDD at 80 % power."""

    seed_t: TTest
    bootstrap: Bootstrap
    mdd80: float

    @property
    def diff(self) -> float:
        return self.seed_t.mean

    def as_dict(self) -> dict:
        """``diff``/``ci95``/``p`` repeat the primary test's (``seed_t``), so that one reading is unambiguous."""
        t = self.seed_t
        return {"diff": t.mean, "ci95": [t.low, t.high], "p": t.p, "primary": "seed_t", "seed_t": t.as_dict(),
                "bootstrap": self.bootstrap.as_dict(), "mdd80": self.mdd80}


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, n_boot: int = 10_000, seed: int = 0,
            confidence: float = CONFIDENCE) -> Comparison:
    """The paired comparison of ``A − B``; ``a[task]``, ``b[task]`` are (S, I_task) 0/1 matrices on the same
    items (columns) and seeds (rows, paired by index). One task is a plain per-task comparison."""
    t = seed_t(a, b, confidence)
    boot = item_bootstrap(a, b, n_boot=n_boot, seed=seed, confidence=confidence)
    return Comparison(t, boot, mdd80(t.se, t.df, confidence=confidence))


# ------------------------------------------------------------------------------------------ seesaw
def regression_threshold(se: np.ndarray | float, df: int, multiple: float = NOISE_MULTIPLE) -> np.ndarray:
    """The Δ below which a task counts as regressed: ``−t_{1−Φ(−k), df} · se`` (module docstring)."""
    return -float(stats.t.isf(stats.norm.cdf(-multiple), df)) * np.asarray(se, dtype=float)


def seesaw_regressions(deltas: Mapping[str, Comparison], multiple: float = NOISE_MULTIPLE) -> dict:
    """Tasks whose Δ is significantly negative (one-sided t at ``Φ(−multiple)``), and how many pure noise would
    give on average (``T · Φ(−multiple)``)."""
    alpha = float(stats.norm.cdf(-multiple))
    thresholds = {t: float(regression_threshold(c.seed_t.se, c.seed_t.df, multiple)) for t, c in deltas.items()}
    # a zero SE (identical runs) has a zero threshold: a drop there is exact, not noise
    regressed = sorted(t for t, c in deltas.items() if c.seed_t.mean < thresholds[t])
    return {"n_regressed_significant": len(regressed), "regressed": regressed,
            "expected_by_noise": len(deltas) * alpha, "alpha_one_sided": alpha, "threshold": thresholds,
            "threshold_se_multiple": multiple}
