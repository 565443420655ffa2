"""Wall time of a search from rates measured on this machine (``tuning.calibrate``), printed by its ``--dry-run``.

A search's trials differ in their hyperparameters, so each method is measured once at the *all-high corner* of
its domains (the largest ranks, top-k and so on: the slowest configuration it can take), which makes the
per-trial rate a floor and the estimate a ceiling for that reason alone. What a trial costs is then the study's
formula (``tuning.estimate``) with ``E`` evaluations of ``S = E · every_n_steps`` steps (the last capped at
``max_steps``) and no test items.

ASHA decides ``E``. With grace ``g``, reduction factor ``η`` and ``T`` evaluations at most, its rungs are
``g η^k < T``, one set per method (``tuning.asha``). At its nominal rate a share ``η^-k - η^-(k+1)`` of the trials
would stop at rung ``k``; asynchronous ASHA promotes more than that while its rungs are sparsely filled (the first
trial at a rung always goes on: of 4 trials at η 3 about 2.4 run to ``T``, not 1), so ``E`` per trial is its
expectation under Ray's rule (:func:`stop_evaluations`), and the estimate also gives the ceiling with no trial
stopped.
After the trials, the chosen ones (best per method and the Pareto front, assumed to be twice the number of
methods, at the methods' mean scoring rate) score the test pool once, in one task; before them, the zero-shot
reference scores val and test.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from orchestrator.report.search_report import rungs
from orchestrator.spec.space import SearchSpec
from orchestrator.tuning.estimate import Estimate, Rates, RunShape, estimate, probe_examples, shared, slowdown_text

BOUND_S = 180 * 60  # issue 32: the CPU search of record within 180 minutes on the 2-core machine


def stop_evaluations(n: int, grace: int, eta: int, max_t: int, enabled: bool = True, *, draws: int = 4000
                     ) -> list[int]:
    """Evaluations each of ``n`` trials of one method runs under Ray's asynchronous ASHA (module docstring), most
    trials first: the trials that stop at each milestone and those that reach ``max_t``, expected over the orders
    their scores can come in, rounded to whole trials (largest remainder, summing to ``n``).

    Model: each trial has one score, kept at every rung (rank-correlated across rungs, as a trial's val accuracy
    largely is), and reaches each rung in the order the trials started; at a rung it stops when its score is below
    the ``(1 - 1/eta)`` quantile (linear, Ray's ``np.nanpercentile``) of the scores recorded there before it, and is
    recorded either way. The first trial at a rung always goes on, so few trials keep more than the nominal
    ``eta^-K``: with one rung the ``k``-th trial goes on with probability ``(1 + (k - 2)/eta) / k`` (``k >= 2``)."""
    if not enabled:
        return [max_t] * n
    milestones = rungs(grace, eta, max_t)
    rng = np.random.default_rng(0)
    stops = np.zeros(len(milestones) + 1)   # trials stopping at each milestone; the last: reaching max_t
    for _ in range(draws):
        recorded: list[list[float]] = [[] for _ in milestones]
        for score in rng.random(n):
            at = len(milestones)
            for k, rec in enumerate(recorded):
                cutoff = np.percentile(rec, 100 * (1 - 1 / eta)) if rec else None
                rec.append(score)
                if cutoff is not None and score < cutoff:
                    at = k
                    break
            stops[at] += 1
    expected = stops / draws
    counts = np.floor(expected).astype(int)
    for i in np.argsort(-(expected - counts), kind="stable")[:n - counts.sum()]:
        counts[i] += 1
    return [t for t, c in zip([*milestones, max_t], counts) for _ in range(c)]


def calibration_configs(spec: SearchSpec) -> dict[str, dict[str, Any]]:
    """Tune-style configs, one per method, at the all-high corner of its domains."""
    from orchestrator.spec.hparams import corner_points

    out = {}
    for method in spec.methods:
        high = corner_points(method)[1]
        out[method.kind] = {"method": method.kind, **{f"{method.kind}.{n}": list(v) if isinstance(v, tuple) else v
                                                      for n, v in high.items()}}
    return out


def search_shapes(spec: SearchSpec, splits: dict[str, dict], mixture: dict[str, int],
                  stop_all: bool) -> list[RunShape]:
    """The counts of every trial of the search, in the order the searcher hands them out (methods in turn)."""
    from orchestrator.tuning.plan import asha_max_t

    t, a = spec.train, spec.search.asha
    per_step = t.batch_size * t.grad_accum * spec.resources.workers_per_trial
    max_steps = t.max_steps or math.ceil(t.epochs * sum(mixture.values()) / per_step)
    quota = spec.search.num_trials // len(spec.methods)
    evals = stop_evaluations(quota, a.grace_period, a.reduction_factor, asha_max_t(spec), a.enabled and stop_all)
    shapes = []
    for i, e in enumerate(evals):
        for m in spec.methods:
            steps = min(max_steps, e * spec.eval.every_n_steps)
            shapes.append(RunShape(f"{m.kind} trial {i}", m.kind, steps, per_step, dict(mixture),
                                   {k: s["val"] for k, s in splits.items()}, {}, e, probe_examples(spec, len(mixture))))
    return shapes


def search_estimate(spec: SearchSpec, rates: Rates, splits: dict[str, dict], mixture: dict[str, int],
                    slots: int) -> tuple[Estimate, Estimate, float]:
    """(at ASHA's expected stopping, with no trial stopped, test scoring of the chosen trials in seconds)."""
    zero = {t: s["val"] + s["test"] for t, s in splits.items()}
    nominal, ceiling = (estimate(search_shapes(spec, splits, mixture, stop), rates, slots=slots,
                                 zero_shot_items=zero) for stop in (True, False))
    chosen = 2 * len(spec.methods)
    per_trial = sum(s["test"] * sum(rates.score_s_per_item[m.kind][t] for m in spec.methods) / len(spec.methods)
                    for t, s in splits.items())  # a chosen trial is of any method: their mean rate
    # dealt to the slots (tuning.chosen), each slowed by the others
    return nominal, ceiling, math.ceil(chosen / slots) * per_trial * shared(rates, min(slots, chosen))


def search_estimate_text(spec: SearchSpec, *, refresh: bool = False, bound_s: float = BOUND_S) -> str:
    """The --dry-run lines of a search: the measured rates and the wall-time estimate against ``bound_s``."""
    from orchestrator.tuning.calibrate import cached_rates
    from orchestrator.tuning.plan import concurrency
    from orchestrator.data.suites import load_pools
    from orchestrator.tuning.study import mixture_counts

    slots = concurrency(spec, {"CPU": float(os.cpu_count() or 1)})
    rates, meta = cached_rates(spec, calibration_configs(spec), slots=slots, refresh=refresh)
    nominal, ceiling, test_s = search_estimate(spec, rates, load_pools(spec).splits(), mixture_counts(spec), slots)
    m = lambda s: f"{s / 60:.1f} min"  # noqa: E731
    total, worst = nominal.wall_s + test_s, ceiling.wall_s + test_s
    source = f"cached {meta['path']}" if meta["cached"] else f"measured now in {meta['calibration_s']} s"
    return "\n".join([
        f"  rates        measured {meta['measured_at']} ({source}; --recalibrate to measure again), one trial "
        "alone at each method's all-high corner: " + ", ".join(
            f"{k} {r:.0f} tokens/s" for k, r in rates.train_tokens_per_s.items()) + slowdown_text(rates, slots),
        f"  estimate     {m(total)} wall on {slots} slot(s) at ASHA's expected stopping: zero-shot "
        f"{m(nominal.zero_shot_s)}, {len(nominal.run_s)} trials (training {m(nominal.train_s)} + val "
        f"{m(nominal.score_s)} summed), test of ~{2 * len(spec.methods)} chosen trials {m(test_s)}",
        f"               {m(worst)} if ASHA stopped no trial (training {m(ceiling.train_s)} + val "
        f"{m(ceiling.score_s)} summed)",
        f"  bound        {m(bound_s)}: " + (f"EXCEEDED by {m(total - bound_s)}. Fix: fewer search.num_trials, "
                                           "train.max_steps or data.val_limit" if total > bound_s else "within it")])
