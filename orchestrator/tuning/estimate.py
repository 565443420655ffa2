"""Wall time of a study from rates measured on this machine (``tuning.calibrate``), printed by ``--dry-run``.

Per run ``j`` of the study's grid (``tuning.study.plan_runs``), with its method ``m``, ``S_j`` optimizer steps,
``b`` examples a step (batch x grad_accum), ``τ_j`` real tokens per training example (the token-weighted mean
of its tasks' examples: the mixture's shares for a multi-task run, the one task for a single-task run), ``E_j``
evaluations (``ceil(S_j / every_n_steps)``), ``V_jt`` / ``T_jt`` val / test items of task ``t`` it scores:

    time_j = setup_m + (S_j · b + E_j · P_j) · τ_j / R_m + Σ_t (E_j · V_jt + T_jt) · s_mt

``P_j`` the gradient-conflict probe's examples per evaluation (``eval.probe_items`` per task of a multi-task
run with ``eval.grad_conflict``; a forward and backward each, so at the training rate), ``R_m`` real tokens/s of
one trial of method ``m`` (its threads), ``s_mt`` seconds per scored item of task ``t``
(its options: 2 for BoolQ / PIQA, 4 for ARC / OBQA), ``setup_m`` building the run (model, adapters, data). The
runs go to ``c`` concurrent slots in grid order, each to the slot free first (how Tune fills
``max_concurrent_trials``), so the study's wall time is the zero-shot reference (its val + test items scored
once, before the runs, at the base model's ``s_0t``) plus that schedule's makespan, each run's time multiplied by
the measured slowdown ``k`` of ``c`` trials at once when ``c > 1`` (``tuning.contention``; the zero-shot reference
runs alone), and by ``f``, the share of the cores that Ray's own processes take while the trials run
(``tuning.ray_overhead``). Ray's start per trial (a few seconds, ``benchmarks/README.md`` "Orchestration
overhead") and the report are not counted.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

BOUND_S = 150 * 60  # the default study.time_bound_min (issue 23: the CPU study within 150 minutes)


@dataclass(frozen=True)
class Rates:
    """What one trial achieves on this machine, measured (``tuning.calibrate``)."""

    train_tokens_per_s: Mapping[str, float]
    """Method -> real (non-pad) training tokens per second of one trial."""
    score_s_per_item: Mapping[str, Mapping[str, float]]
    """Method -> task -> seconds per scored item; key ``"zero_shot"`` for the base model."""
    setup_s: Mapping[str, float]
    """Method -> seconds to build one run (load the model, inject the adapter, encode the data)."""
    tokens_per_example: Mapping[str, float]
    """Task -> mean real tokens of a training example (the space's formulation and max_length)."""
    slowdown: float = 1.0
    """``k``: how much longer a run takes while ``slowdown_slots`` trials share the machine (``tuning.contention``;
    1.0: one slot, a GPU per slot, or a cache from before it was measured)."""
    slowdown_slots: int = 1
    ray_cores: float | None = None
    """Cores Ray's own processes took while ``slowdown_slots`` trials ran (``tuning.ray_overhead``); None: not
    measured (trials on GPUs, or a cache from before it was)."""
    ray_slowdown: float = 1.0
    """``f``: how much longer a run takes because Ray's processes share its cores (``tuning.ray_overhead``)."""


@dataclass(frozen=True)
class RunShape:
    """What one study run does, in counts (no rates)."""

    name: str
    method: str
    steps: int
    examples_per_step: int
    tasks: Mapping[str, int]
    """Task -> its training examples in the run's stream (the weights of ``τ_j``)."""
    val_items: Mapping[str, int]
    test_items: Mapping[str, int]
    evaluations: int
    probe_examples: int = 0
    """The gradient-conflict probe's examples at each evaluation (``P_j``; 0 without it)."""


@dataclass(frozen=True)
class Estimate:
    zero_shot_s: float
    run_s: Sequence[tuple[str, float]]
    slots: int
    wall_s: float
    train_s: float = field(default=0.0)
    """Training seconds summed over runs (one slot each)."""
    score_s: float = field(default=0.0)
    """Scoring seconds summed over runs."""

    def exceeds(self, bound_s: float = BOUND_S) -> bool:
        return self.wall_s > bound_s


def probe_examples(spec: Any, n_tasks: int) -> int:
    """``P_j``: the gradient-conflict probe's examples per evaluation, ``eval.probe_items`` per task of a multi-task
    run with ``eval.grad_conflict`` on (a single-task run has no pair to compare)."""
    return spec.eval.probe_items * n_tasks if spec.eval.grad_conflict and n_tasks > 1 else 0


def tokens_per_example(shape: RunShape, rates: Rates) -> float:
    """``τ_j``: the mean real tokens of the run's examples, weighted by each task's examples in its stream."""
    total = sum(shape.tasks.values())
    return sum(n * rates.tokens_per_example[t] for t, n in shape.tasks.items()) / total


def run_parts(shape: RunShape, rates: Rates) -> tuple[float, float, float]:
    """(setup, training, scoring) seconds of one run (module docstring)."""
    examples = shape.steps * shape.examples_per_step + shape.evaluations * shape.probe_examples
    train = examples * tokens_per_example(shape, rates) / rates.train_tokens_per_s[shape.method]
    per_item = rates.score_s_per_item[shape.method]
    score = sum((shape.evaluations * shape.val_items.get(t, 0) + shape.test_items.get(t, 0)) * per_item[t]
                for t in set(shape.val_items) | set(shape.test_items))
    return rates.setup_s[shape.method], train, score


def makespan(durations: Sequence[float], slots: int) -> float:
    """Finish time of ``durations`` run in order, each on the slot that frees first."""
    free = [0.0] * max(1, slots)
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def shared(rates: Rates, slots: int) -> float:
    """The factor on a run's time with ``slots`` trials at once: the measured slowdown ``k`` (1 for one slot) times
    ``f``, the share of the cores Ray's own processes take (measured at ``rates.slowdown_slots``)."""
    return (rates.slowdown if slots > 1 else 1.0) * (rates.ray_slowdown if slots == rates.slowdown_slots else 1.0)


def estimate(shapes: Sequence[RunShape], rates: Rates, *, slots: int, zero_shot_items: Mapping[str, int]) -> Estimate:
    """The study's wall time: the zero-shot reference, then the runs on ``slots`` concurrent slots, each slowed
    by the others (``shared``)."""
    k = shared(rates, slots)
    parts = [tuple(k * x for x in run_parts(s, rates)) for s in shapes]
    zero = sum(n * rates.score_s_per_item["zero_shot"][t] for t, n in zero_shot_items.items())
    runs = [(s.name, sum(p)) for s, p in zip(shapes, parts)]
    return Estimate(zero, runs, slots, zero + makespan([d for _, d in runs], slots),
                    train_s=sum(p[1] for p in parts), score_s=sum(p[2] for p in parts))


def evaluations(steps: int, every_n_steps: int) -> int:
    """Evaluations of a run: at every multiple of ``every_n_steps`` and at the last step."""
    return math.ceil(steps / every_n_steps)


def slowdown_text(rates: Rates, slots: int) -> str:
    """The rates line's tail: the measured slowdown of ``slots`` trials at once, which the estimate applies."""
    ray = (f"; Ray's own processes take {rates.ray_cores:.2f} cores: each run {rates.ray_slowdown:.2f}x longer "
           "(measured, applied)" if rates.ray_cores is not None else "")
    if slots <= 1:
        return ray
    if rates.slowdown_slots != slots:
        return f"; slowdown of {slots} trials at once not measured (a cache from before it was): --recalibrate"
    return f"; {slots} trials at once each run {rates.slowdown:.2f}x slower (measured; applied to every run)" + ray


def describe_estimate(est: Estimate, bound_s: float = BOUND_S) -> str:
    """The --dry-run lines: total, its parts, and whether it exceeds the bound."""
    m = lambda s: f"{s / 60:.1f} min"  # noqa: E731
    longest = max(est.run_s, key=lambda r: r[1]) if est.run_s else ("-", 0.0)
    lines = [f"  estimate     {m(est.wall_s)} wall for the whole study on {est.slots} concurrent slot(s): zero-shot "
             f"{m(est.zero_shot_s)}, then {len(est.run_s)} runs (training {m(est.train_s)} + scoring "
             f"{m(est.score_s)} summed over runs; longest {longest[0]} {m(longest[1])})",
             f"  bound        {m(bound_s)}: " + (
                 f"EXCEEDED by {m(est.wall_s - bound_s)}. Fix: fewer train.max_steps or data.test_limit, sized by "
                 "benchmarks/study_power.py" if est.exceeds(bound_s) else "within it")]
    return "\n".join(lines)
