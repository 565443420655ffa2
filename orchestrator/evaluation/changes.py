"""Did training change per-item answers? The share of items whose chosen option moved away from zero-shot.

A model that learned only a task's answer prior moves many items to one option, right or wrong; a model that
learned per-item knowledge moves items to their gold option. For one task, with zero-shot choices z_i, trained
choices c_{s,i} (seed s, item i) and correctness z*_i, c*_{s,i} in {0, 1}::

    changed   = mean_s mean_i [c_{s,i} != z_i]
    to_gold   = mean_s mean_i [c*_{s,i} = 1 and z*_i = 0]      (changed, to the gold option)
    from_gold = mean_s mean_i [c*_{s,i} = 0 and z*_i = 1]      (changed, away from the gold option)

``to_gold - from_gold`` is the accuracy change; ``to_gold / changed`` says how many of the changes were to gold
(chance for a random change among K options is about 1/(K-1) of the changes away from a wrong answer).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ItemChanges:
    """Per-item changes of one task from zero-shot to trained (means over seeds; see the module docstring)."""

    n_items: int
    n_seeds: int
    changed: float
    to_gold: float
    from_gold: float

    @property
    def to_gold_of_changed(self) -> float:
        """Share of the changed items that changed to the gold option (NaN when nothing changed)."""
        return self.to_gold / self.changed if self.changed else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "to_gold_of_changed": self.to_gold_of_changed}


def item_changes(zero_chosen: Sequence[int], zero_correct: Sequence[int], chosen: Sequence[Sequence[int]],
                 correct: Sequence[Sequence[int]]) -> ItemChanges:
    """``zero_*``: (I,) the base model's chosen option index and 1/0 per item; ``chosen``/``correct``: (S, I)
    the trained runs' (one row per seed), all on the same items in the same order."""
    z, zc = np.asarray(zero_chosen), np.asarray(zero_correct, dtype=bool)
    c, cc = np.atleast_2d(np.asarray(chosen)), np.atleast_2d(np.asarray(correct, dtype=bool))
    if c.shape != cc.shape or c.shape[1:] != z.shape or z.shape != zc.shape:
        raise ValueError(f"item vectors disagree: zero-shot {z.shape}/{zc.shape}, trained {c.shape}/{cc.shape}")
    if not z.size:
        raise ValueError("no items")
    return ItemChanges(n_items=int(z.size), n_seeds=int(c.shape[0]), changed=float((c != z).mean()),
                       to_gold=float((cc & ~zc).mean()), from_gold=float((~cc & zc).mean()))
