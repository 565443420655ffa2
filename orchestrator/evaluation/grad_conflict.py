"""Gradient conflict between tasks at each evaluation: do the tasks pull the shared parameters apart?

**Probe.** Per task, ``eval.probe_items`` items of its *train* pool, encoded as training encodes them, drawn once
from a permutation seeded by ``data.split_seed`` and the task's name (:func:`probe_items`): the pools depend only
on that seed, so every evaluation, every method and seed of a study, and a resumed trial use the same items. An
item that does not fit ``data.max_length`` is passed over for the next one in the permutation. Their keys
(``orchestrator.data.pools.item_key``) are recorded.

**Cosines.** g_t = d L_t / d theta, the gradient of task t's LM loss (response tokens; no balance term) on its
probe batch, in eval mode (no dropout); per group G of trainable tensors (role x layer group,
:func:`malora.diagnostics.default_groups`, and ``all``) the (T, T) cosine C_G (:func:`malora.diagnostics.
gradient_cosines`). Metrics per group:

* ``grad_conflict/<group>/mean`` the mean of C_G over the task pairs s < t;
* ``grad_conflict/<group>/min`` the most negative pair's cosine (which pair: the record, and a run tag at the end);
* ``grad_cos/<a>/<b>`` (a before b in task order) every pair's cosine over all trainable tensors (``all``), so
  each pair has its curve;
* ``grad_conflict_s`` the diagnostic's wall time (its cost against ``step_time_s``).

A group whose gradient is zero for a task (at step 0 the LoRA A of a zero B) has NaN there and is left out of
the means. Nothing is computed with fewer than two tasks.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from malora.diagnostics import conflict_summary, gradient_cosines
from orchestrator.data.pools import item_key


@dataclass(frozen=True)
class Probe:
    """The probe of a trial: per task one collated batch (``input_ids``, ``attention_mask``, ``labels``), the
    keys of its items and the seed that drew them."""

    seed: int
    batches: dict[str, dict[str, torch.Tensor]]
    keys: dict[str, list[str]]

    def record(self) -> dict[str, Any]:
        return {"seed": self.seed, "keys": self.keys}


def probe_items(train: Mapping[str, list], encode: Callable[[str, Any], dict | None], n: int, seed: int
                ) -> dict[str, list[tuple[Any, dict]]]:
    """Per task (sorted), up to ``n`` (item, encoded row) pairs: the first ``n`` items of the seeded permutation
    of its train pool that ``encode(task, item)`` fits (not None)."""
    out = {}
    for task in sorted(train):
        items = list(train[task])
        order = list(range(len(items)))
        random.Random(f"grad-probe/{seed}/{task}").shuffle(order)
        picked = []
        for i in order:
            row = encode(task, items[i])
            if row is not None:
                picked.append((items[i], row))
                if len(picked) == n:
                    break
        if picked:
            out[task] = picked
    return out


def build_probe(train: Mapping[str, list], encode: Callable[[str, Any], dict | None], n: int, seed: int,
                pad_id: int) -> Probe | None:
    """The :class:`Probe` of :func:`probe_items`; None with fewer than two tasks (no pair to compare)."""
    from orchestrator.data.tokenize import collate

    picked = probe_items(train, encode, n, seed)
    if len(picked) < 2:
        return None
    return Probe(seed, {t: collate([row for _, row in rows], pad_id) for t, rows in picked.items()},
                 {t: [item_key(ex) for ex, _ in rows] for t, rows in picked.items()})


def conflict_diagnostics(model: torch.nn.Module, probe: Probe, device: torch.device,
                         loss_fn: Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
                         ) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics of the module docstring, record) for ``model`` on ``probe``; ``loss_fn(model, batch)`` is the LM
    loss of one batch. The record: ``{"tasks", "cos": {group: (T, T) list, None for NaN}, "most_negative":
    {group: {"pair": [a, b] or None, "value"}}, "mean": {group: value}, "probe": {"seed", "keys"}}``."""
    t0 = time.perf_counter()
    tasks = list(probe.batches)
    batches = {t: {k: v.to(device) for k, v in b.items()} for t, b in probe.batches.items()}
    cos = gradient_cosines(model, batches, loss_fn=loss_fn)
    metrics: dict[str, float] = {}
    record: dict[str, Any] = {"tasks": tasks, "cos": {}, "most_negative": {}, "mean": {}, "probe": probe.record()}
    for group, matrix in sorted(cos.items()):
        s = conflict_summary(matrix, tasks)
        record["cos"][group] = [[None if math.isnan(v) else float(v) for v in row] for row in matrix]
        record["most_negative"][group] = {"pair": list(s["pair"]) if s["pair"] else None,
                                          "value": None if math.isnan(s["min"]) else s["min"]}
        record["mean"][group] = None if math.isnan(s["mean"]) else s["mean"]
        if not math.isnan(s["mean"]):
            metrics[f"grad_conflict/{group}/mean"] = s["mean"]
            metrics[f"grad_conflict/{group}/min"] = s["min"]
    rows, cols = np.triu_indices(len(tasks), k=1)
    for i, j in zip(rows, cols):
        value = cos["all"][i, j]
        if not math.isnan(value):
            metrics[f"grad_cos/{tasks[i]}/{tasks[j]}"] = float(value)
    metrics["grad_conflict_s"] = time.perf_counter() - t0
    return metrics, record
