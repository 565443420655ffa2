"""Seeds and items both random: the variance of a paired difference under a crossed seed x item model.

Why: the study's items are a sample of each task, as its seeds are a sample of training runs. A test that holds the
items fixed (t over the per-seed differences) answers "on these 1,600 items"; a claim about the task needs the item
variance too (Clark 1973, the language-as-fixed-effect fallacy). With a method x item interaction -- some items
favour A, others B, averaging to nothing over the task -- the per-seed t rejects a true null far above its nominal
rate, because the items' draw never enters its variance.

Model: for task t (T tasks, ``I_t`` items, the same S seeds for every task), the paired difference of two runs on
item i at seed s (1/0 answers: values in {-1, 0, 1}) is ::

    d[t][s, i] = μ_t + a_s + b_ti + e_tsi        a ~ (0, σ_a²), b_t ~ (0, σ_bt²), e_t ~ (0, σ_et²)

``a_s`` is the seed's whole-run effect (one training run serves every task, so it is shared across tasks),
``b_ti`` the method x item interaction, ``e`` what is left (answers that flip between seeds). The headline is the
mean over tasks ``D = (1/T) Σ_t mean_{s,i} d[t][s, i]``, whose variance over new seeds *and* new items is ::

    Var(D) = σ_a² / S + (1/T²) Σ_t (σ_bt² / I_t + σ_et² / (S · I_t))

Estimates from the two-way ANOVA mean squares (moments, no distribution assumed), per task with ``d̄_s`` the seed
means, ``d̄_i`` the item means: ``MS_r,t`` = Σ (d − d̄_s − d̄_i + d̄)² / ((S−1)(I_t−1)) estimates σ_et²;
``v_it = var_i(d̄_i)`` estimates σ_bt² + σ_et²/S; ``v_s = var_s(D_s)`` of the per-seed task means estimates
σ_a² + (1/T²) Σ_t σ_et²/I_t. Hence ::

    SE² = v_s / S + (1/T²) Σ_t max(0, v_it − MS_r,t / S) / I_t

is (up to the truncation of each item component at 0) unbiased for Var(D): the first term is exactly the squared
standard error of the t over per-seed differences (the test conditional on the items), the second the method x
item interaction it leaves out, so the crossed SE is never below the conditional one. (Identical per-seed
differences while answers do change between seeds: v_s = 0 by chance, and the residual's share of it,
Σ_t MS_r,t / (S I_t T²), stands in.)

The reference distribution: ``D / SE`` is compared with a critical value ``c`` midway between Satterthwaite's and
Cochran-Cox's. Satterthwaite's df ``SE⁴ / Σ_k (c_k m_k)² / df_k`` over the mean-square terms ``m_k`` in SE²
(coefficients ``c_k = ±1``; df S−1 for v_s, I_t−1 for v_it, (S−1)(I_t−1) for MS_r,t) is liberal when a 2-df seed
term is mixed with a small item term (7.4-7.7 % at 3 seeds); Cochran-Cox's variance-weighted mean of the terms'
own critical values (seed term at S−1 df, item terms at their Satterthwaite df) is conservative (2.8-3.7 %). Their
midpoint rejected 3.4-5.9 % at nominal 5 % over 22 simulated regimes (method x item interaction SD 0-0.5 on the
probit scale, run SD 0-0.1, 3 and 5 seeds, 5 tasks x 320 items, about 4 % of answers flipping between seeds), where
the per-seed t rejected up to 49 % (13-49 % wherever the interaction SD is 0.3 or more):
``python benchmarks/stat_calibration.py --crossed``. The test reports ``df``: the effective degrees of freedom
whose two-sided 95 % t quantile is ``c``, so p-values, CIs and the MDD read off one Student t (exact at the 5 %
level, an approximation at others: the one-sided seesaw flags at Φ(−2) = 2.3 % flagged 1.4-2.6 %). The suite pins
two regimes within [3 %, 7 %] (``tests/orchestrator/evaluation/test_crossed.py``).

Rejected alternatives: truncating the seed component too (σ̂_a² at 0) drops the S−1-df protection exactly when v_s
is small by chance (up to 7.7 %); a bootstrap: resampling 3 seeds gives 10 distinct multisets and shrinks the seed
variance by (S−1)/S, and a joint seed+item bootstrap double-counts the residual (0.4-8.4 % at nominal 5 %).

Power: :func:`project_se` evaluates the same formula for another design (S' seeds, I' items per task) from a
pilot's components, with the critical-value rule applied to the expected mean squares, so the study's MDD and its
sizing share one variance model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Components:
    """Variance components of a paired difference (module docstring), per task in ``tasks`` order."""

    seed: float                    # σ̂_a² = v_s − (1/T²) Σ_t MS_r,t / I_t, truncated at 0
    item: tuple[float, ...]        # σ̂_bt², truncated at 0
    residual: tuple[float, ...]    # σ̂_et² = MS_r,t
    seeds: int
    items: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"seed": self.seed, "item": list(self.item), "residual": list(self.residual), "seeds": self.seeds,
                "items": list(self.items)}


def _mean_squares(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``d`` (..., S, I): per-seed means (..., S), ``v_i`` = var over items of the item means (...) and the
    interaction mean square ``MS_r`` (...)."""
    s, i = d.shape[-2:]
    seed_means, item_means = d.mean(axis=-1), d.mean(axis=-2)          # (..., S), (..., I)
    grand = d.mean(axis=(-2, -1))                                      # (...)
    resid = d - seed_means[..., :, None] - item_means[..., None, :] + grand[..., None, None]
    ms_r = (resid ** 2).sum(axis=(-2, -1)) / ((s - 1) * (i - 1))
    return seed_means, item_means.var(axis=-1, ddof=1), ms_r


def _df_for_critical(crit: np.ndarray, low: float, confidence: float) -> np.ndarray:
    """The df whose two-sided ``confidence`` t quantile is ``crit`` (bisection on log df in [low, 1e6]: the
    quantiles fall as df grows)."""
    q = 0.5 + confidence / 2
    lo = np.full(np.shape(crit), math.log(low))
    hi = np.full(np.shape(crit), math.log(1e6))
    for _ in range(50):
        mid = (lo + hi) / 2
        too_few = stats.t.ppf(q, np.exp(mid)) > crit
        lo, hi = np.where(too_few, mid, lo), np.where(too_few, hi, mid)
    return np.exp((lo + hi) / 2)


def _effective_df(term_a, rest, rest_denom, seeds: int, confidence: float) -> np.ndarray:
    """The test's df (module docstring) for SE² = term_a + rest, ``term_a`` with S−1 df, ``rest`` the item terms
    with Satterthwaite denominator ``rest_denom``: the df whose quantile is the midpoint of Satterthwaite's and
    Cochran-Cox's critical values."""
    q = 0.5 + confidence / 2
    se2 = term_a + rest
    with np.errstate(divide="ignore", invalid="ignore"):
        satterthwaite = stats.t.ppf(q, se2 ** 2 / (term_a ** 2 / (seeds - 1) + rest_denom))
        rest_crit = stats.t.ppf(q, np.where(rest > 0, rest ** 2 / np.where(rest_denom > 0, rest_denom, 1.0), 1e6))
        cochran_cox = (term_a * stats.t.ppf(q, seeds - 1) + rest * rest_crit) / se2
    crit = np.nan_to_num((satterthwaite + cochran_cox) / 2, nan=1.0)
    return _df_for_critical(crit, seeds - 1, confidence)


def crossed_se(diffs: Sequence[np.ndarray], confidence: float = 0.95
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Components | None]:
    """``(D, SE, df, components)`` of the mean-over-tasks paired difference, seeds and items random.

    ``diffs``: per task a (..., S, I_t) array of paired differences, the same S and leading axes for every task
    (leading axes vectorise simulations). ``df``: the effective degrees of freedom at ``confidence`` (module
    docstring). ``components`` is filled when there are no leading axes. Needs S >= 2 and I_t >= 2. SE 0 (every
    per-seed difference identical and no item component) gives df NaN: these answers determine no test.
    """
    diffs = [np.asarray(d, dtype=float) for d in diffs]
    s = diffs[0].shape[-2]
    if s < 2 or min(d.shape[-1] for d in diffs) < 2:
        raise ValueError("the crossed seed x item variance needs at least 2 seeds and 2 items per task")
    n_tasks = len(diffs)
    parts = [_mean_squares(d) for d in diffs]
    per_seed = np.mean([p[0] for p in parts], axis=0)                    # (..., S): D_s
    big_d = per_seed.mean(axis=-1)
    term_a = per_seed.var(axis=-1, ddof=1) / s                           # the per-seed t's SE²
    items = [d.shape[-1] for d in diffs]
    rest, rest_denom, item_var = np.zeros_like(term_a), np.zeros_like(term_a), []
    for (_, v_i, ms_r), n in zip(parts, items):
        b, r = v_i / (n * n_tasks ** 2), ms_r / (s * n * n_tasks ** 2)  # v_it and MS_r,t in their place in SE²
        keep = b > r                                                     # σ̂_bt² > 0
        rest = rest + np.where(keep, b - r, 0.0)
        rest_denom = rest_denom + np.where(keep, b ** 2 / (n - 1) + r ** 2 / ((s - 1) * (n - 1)), 0.0)
        item_var.append(np.maximum(v_i - ms_r / s, 0.0))
    # identical per-seed differences (v_s = 0) while answers do change between seeds (MS_r > 0): v_s / S estimates
    # σ_a²/S plus the residual's share Σ_t MS_r,t / (S I_t T²), so that share stands in for it (kept at S−1 df)
    residual_share = sum(p[2] / (s * n * n_tasks ** 2) for p, n in zip(parts, items))
    term_a = np.where((term_a <= 1e-24) & (rest <= 0), residual_share, term_a)
    se2 = term_a + rest
    df = np.where(se2 > 0, _effective_df(term_a, rest, rest_denom, s, confidence), np.nan)
    comps = None
    if big_d.ndim == 0:   # σ̂_a² = v_s − (1/T²) Σ_t MS_r,t / I_t = v_s − S · residual_share
        comps = Components(max(0.0, float(per_seed.var(ddof=1)) - s * float(residual_share)),
                           tuple(float(v) for v in item_var),
                           tuple(float(p[2]) for p in parts), s, tuple(items))
    return big_d, np.sqrt(se2), df, comps


def project_se(components: Components, seeds: int, items_per_task: int | Sequence[int]) -> tuple[float, float]:
    """``(SE, df)`` of the mean-over-tasks difference at ``seeds`` seeds and ``items_per_task`` items (an int for
    every task, or one per task), from a pilot's :class:`Components` (the module docstring's Var(D)); df by the
    test's critical-value rule over the expected mean squares of that design."""
    n_tasks = len(components.item)
    items = [int(items_per_task)] * n_tasks if np.isscalar(items_per_task) else [int(n) for n in items_per_task]
    if seeds < 2 or min(items) < 2:
        raise ValueError("a projection needs at least 2 seeds and 2 items per task")
    e = components.residual
    # the expected mean-square terms of that design, in their places in SE² (see crossed_se): v_s / S, and per task
    # with an item component v_it and MS_r,t
    term_a = components.seed / seeds + sum(er / (seeds * n * n_tasks ** 2) for er, n in zip(e, items))
    rest = rest_denom = 0.0
    for b, er, n in zip(components.item, e, items):
        if b > 0:
            v_i, ms_r = (b + er / seeds) / (n * n_tasks ** 2), er / (seeds * n * n_tasks ** 2)
            rest += v_i - ms_r
            rest_denom += v_i ** 2 / (n - 1) + ms_r ** 2 / ((seeds - 1) * (n - 1))
    return math.sqrt(term_a + rest), float(_effective_df(np.float64(term_a), np.float64(rest),
                                                        np.float64(rest_denom), seeds, 0.95))


def components_from_summary(seed_sd: float, item_se: float, tasks: int, items_per_task: int) -> Components:
    """Components from two figures a report states, when a pilot's per-item answers are not at hand: ``seed_sd``,
    the SD over seeds of the per-seed mean-over-tasks difference, and ``item_se``, the item-level bootstrap SE of
    the mean difference at ``tasks`` x ``items_per_task`` items. The residual cannot be told from the seed term
    then, so it stays in it (it does not shrink with more items): the projection errs towards a larger MDD."""
    item = item_se ** 2 * tasks * items_per_task   # item_se² = (1/T²) Σ_t b_t / I with equal b_t
    return Components(seed_sd ** 2, (item,) * tasks, (0.0,) * tasks, 0, (items_per_task,) * tasks)


def bound_from_summary(seed_se: float, item_se: float, seeds: int, items: int,
                       confidence: float = 0.95) -> tuple[float, float]:
    """``(SE, df)`` bounding the crossed test from two standard errors a report recorded without its per-item
    answers: ``seed_se`` of the per-seed t (v_s / S) and ``item_se`` of the item-level bootstrap (≈ Σ_t v_it /
    (I_t T²) at these seeds). Their squares sum to the crossed SE² plus one residual share, so the SE errs large;
    df by the test's critical-value rule, the item term with ``items`` − 1 df."""
    term_a, rest = seed_se ** 2, item_se ** 2
    return math.sqrt(term_a + rest), float(_effective_df(np.float64(term_a), np.float64(rest),
                                                        np.float64(rest ** 2 / (items - 1)), seeds, confidence))


def simulate_null(rng: np.random.Generator, *, n_sim: int, seeds: int, tasks: int, items: int, interaction: float,
                  run_sd: float, flip_sd: float = 0.15) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Null studies of two methods equal over the population of items, to check a test at one's own design.

    Per task, (n_sim, seeds, items) 0/1 answers: item i of method m at seed s is right when
    ``μ_i + γ_mi + δ_ms + η_msi > 0``, with ``μ ~ N(0.3, 1.5²)`` the item's ease (shared by the methods),
    ``γ ~ N(0, interaction²)`` the method x item interaction (mean 0: no true difference), ``δ ~ N(0, run_sd²)``
    the training run's shift and ``η ~ N(0, flip_sd²)`` what flips between seeds (about 4.5 % of answers at 0.15).
    Fresh items and seeds in every simulated study."""
    a, b = [], []
    for _ in range(tasks):
        mu = rng.normal(0.3, 1.5, size=(n_sim, 1, items))
        gamma = rng.normal(0.0, interaction, size=(2, n_sim, 1, items))
        run = rng.normal(0.0, run_sd, size=(2, n_sim, seeds, 1))
        eta = rng.normal(0.0, flip_sd, size=(2, n_sim, seeds, items))
        a.append((mu + gamma[0] + run[0] + eta[0] > 0).astype(np.float32))
        b.append((mu + gamma[1] + run[1] + eta[1] > 0).astype(np.float32))
    return a, b
