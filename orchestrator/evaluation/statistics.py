"""How sure a reported accuracy is: intervals over seeds or items, paired bootstrap comparisons, noise thresholds.

Notation: a method's test results for one task are a 0/1 matrix ``X`` of shape (S, I) -- S training seeds, I test
items, the same items for every seed and method (``orchestrator.data.pools``). Its accuracy is the grand mean.

- Over seeds (S >= 2): the per-seed accuracies ``a_s`` give mean ``ā`` and the t-interval
  ``ā ± t_{1-α/2, S-1} · sd(a) / sqrt(S)`` (scipy's Student t), clipped to [0, 1]. With 2 seeds
  ``t = 12.7``: an interval that wide says to add seeds, not that the method is bad.
- One seed: the Wilson score interval of ``k`` correct out of ``I`` items (scipy ``binomtest``), since the only
  noise left to state is the item sample. 200 items at 60 % give about ±6.8 points (95 %).
- Paired bootstrap of ``A − B`` (both (S, I) per task, paired by seed index and item): each of ``n_boot`` draws
  resamples the seeds and, per task, the items with replacement, the same indices for A and B, and computes
  the difference of the mean-over-tasks accuracies. CI = the percentile interval; two-sided p-value =
  ``min(1, 2 · min(P*(d ≤ 0), P*(d ≥ 0)))`` with the +1 correction of Davison & Hinkley (1997, §4.4).
- Seesaw regressions: a task regresses only when its Δ against the reference is below ``−k · SE`` (SE = the
  bootstrap standard error of that Δ, from items and seeds); with T tasks pure noise would give about
  ``T · Φ(−k)`` such regressions (one-sided normal tail, scipy's ``norm``), reported beside the count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
NOISE_MULTIPLE = 2.0  # k of the seesaw threshold: a drop counts only beyond 2 standard errors


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


@dataclass(frozen=True)
class Comparison:
    """Paired bootstrap of ``a − b``: mean difference, percentile CI, two-sided p-value, bootstrap SE."""

    diff: float
    low: float
    high: float
    p: float
    se: float
    n_boot: int

    def as_dict(self) -> dict:
        return {"diff": self.diff, "ci95": [self.low, self.high], "p": self.p, "se": self.se, "n_boot": self.n_boot}


def paired_bootstrap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *, n_boot: int = 10_000,
                     seed: int = 0, confidence: float = CONFIDENCE) -> Comparison:
    """Paired bootstrap of the mean-over-tasks accuracy difference ``a − b`` over seeds and items.

    ``a[task]``, ``b[task]``: (S, I_task) 0/1 matrices on the same items (columns) and seeds (rows, paired by
    index). One task is a plain per-task comparison.
    """
    if set(a) != set(b):
        raise ValueError(f"paired comparison needs the same tasks, got {sorted(a)} and {sorted(b)}")
    tasks = sorted(a)
    xa = [np.atleast_2d(np.asarray(a[t], dtype=float)) for t in tasks]
    xb = [np.atleast_2d(np.asarray(b[t], dtype=float)) for t in tasks]
    for t, ma, mb in zip(tasks, xa, xb):
        if ma.shape != mb.shape:
            raise ValueError(f"task {t}: unpaired shapes {ma.shape} and {mb.shape} (seeds x items)")
    rng = np.random.default_rng(seed)
    seeds = xa[0].shape[0]
    diffs = np.zeros(n_boot)
    s_idx = rng.integers(0, seeds, size=(n_boot, seeds))
    for ma, mb in zip(xa, xb):
        d = ma - mb                                                   # (S, I) paired differences
        i_idx = rng.integers(0, d.shape[1], size=(n_boot, d.shape[1]))
        # mean over resampled seeds of the mean over resampled items, for every draw: (n_boot,)
        per_seed_means = d[:, i_idx.T].mean(axis=1)                   # (S, n_boot): item-resampled means per seed
        diffs += np.take_along_axis(per_seed_means.T, s_idx, axis=1).mean(axis=1)
    diffs /= len(tasks)
    observed = float(np.mean([(ma - mb).mean() for ma, mb in zip(xa, xb)]))
    alpha = 1 - confidence
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2 * min((np.sum(diffs <= 0) + 1) / (n_boot + 1), (np.sum(diffs >= 0) + 1) / (n_boot + 1)))
    return Comparison(observed, float(low), float(high), float(p), float(diffs.std(ddof=1)), n_boot)


def seesaw_regressions(deltas: Mapping[str, Comparison], multiple: float = NOISE_MULTIPLE) -> dict:
    """Tasks whose Δ is below ``−multiple · SE``, and how many pure noise would give (``T · Φ(−multiple)``)."""
    regressed = sorted(t for t, c in deltas.items() if c.diff < -multiple * c.se)
    return {"n_regressed_significant": len(regressed), "regressed": regressed,
            "expected_by_noise": len(deltas) * float(stats.norm.cdf(-multiple)), "threshold_se_multiple": multiple}
