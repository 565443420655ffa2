"""Mixing several tasks' training items into one stream, and counting label tokens per task.

With ``n_i`` items in task ``i`` of ``T`` tasks, the sampling weight of task ``i`` is

- proportional: ``p_i = n_i / sum_j n_j``
- uniform:      ``p_i = 1 / T``
- temperature:  ``p_i = n_i^(1/tau) / sum_j n_j^(1/tau)``  (``tau = 1`` proportional, ``tau -> inf`` uniform)

A mix of ``N`` items (default ``N = sum_i n_i``, the size of one proportional epoch) holds
``c_i = round(N p_i)`` items of task ``i`` (largest-remainder rounding, so ``sum c_i = N`` exactly). Items of a
task are drawn without replacement from a seeded permutation; when ``c_i > n_i`` the task is repeated in whole
fresh permutations (up-sampling), so no item is used twice before every item has been used once. The final
stream is shuffled with the same seed.

MALoRA (Table 7) explains why the label-token count matters: token-heavy tasks dominate the loss, so
``label_token_counts`` is logged next to the mixing weights.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

from orchestrator.data.schema import DataError, Example

STRATEGIES = ("proportional", "uniform", "temperature")


def mixture_weights(sizes: Mapping[str, int], strategy: str = "proportional", *, temperature: float = 2.0
                    ) -> dict[str, float]:
    """Sampling weight ``p_i`` per task (sums to 1); tasks with no items get weight 0."""
    if strategy not in STRATEGIES:
        raise DataError(f"mixing strategy {strategy!r} is unknown; use one of {list(STRATEGIES)}")
    if strategy == "temperature" and not (temperature > 0 and math.isfinite(temperature)):
        raise DataError(f"temperature={temperature!r} must be a positive finite number")
    present = {k: n for k, n in sizes.items() if n > 0}
    if not present:
        raise DataError("cannot mix: every task has zero training items")
    if strategy == "proportional":
        raw = {k: float(n) for k, n in present.items()}
    elif strategy == "uniform":
        raw = {k: 1.0 for k in present}
    else:
        raw = {k: float(n) ** (1.0 / temperature) for k, n in present.items()}
    total = sum(raw.values())
    return {k: raw.get(k, 0.0) / total for k in sizes}


def mixture_counts(weights: Mapping[str, float], num_examples: int) -> dict[str, int]:
    """``c_i = round(N p_i)`` by largest remainder, ties broken by task order; ``sum c_i == N``."""
    exact = {k: num_examples * w for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    short = num_examples - sum(counts.values())
    order = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(weights).index(k)))
    for k in order[:short]:
        counts[k] += 1
    return counts


def mix_examples(
    train_by_task: Mapping[str, Sequence[Example]],
    strategy: str = "proportional",
    *,
    temperature: float = 2.0,
    num_examples: int | None = None,
    seed: int = 0,
) -> list[tuple[str, Example]]:
    """A shuffled list of ``(task, example)`` pairs following ``strategy`` (see the module docstring)."""
    sizes = {k: len(v) for k, v in train_by_task.items()}
    weights = mixture_weights(sizes, strategy, temperature=temperature)
    total = sum(sizes.values()) if num_examples is None else num_examples
    if total < 1:
        raise DataError(f"num_examples={num_examples!r} must be a positive integer")
    counts = mixture_counts(weights, total)
    mixed: list[tuple[str, Example]] = []
    for task, count in counts.items():
        items, rng, taken = train_by_task[task], random.Random(f"{seed}:{task}:mix"), 0
        while taken < count:
            order = list(range(len(items)))
            rng.shuffle(order)
            for i in order[: count - taken]:
                mixed.append((task, items[i]))
            taken += min(len(items), count - taken)
    random.Random(f"{seed}:mix").shuffle(mixed)
    return mixed


def label_token_counts(tokenizer, train_by_task: Mapping[str, Sequence[Example]]) -> dict[str, int]:
    """Number of target (label) tokens per task: ``sum_x len(tokenize(x.target))``, without special tokens."""
    counts = {}
    for task, items in train_by_task.items():
        if not items:
            counts[task] = 0
            continue
        encoded = tokenizer([ex.target for ex in items], add_special_tokens=False)["input_ids"]
        counts[task] = sum(len(ids) for ids in encoded)
    return counts
