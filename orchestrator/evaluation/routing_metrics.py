"""Expert specialisation per task at one evaluation: I(task; expert) per routed layer, from the val routing shares.

Input: ``util[task][layer]`` = share (E,) of that task's val token-slots each expert of the layer received (real
tokens only: what ``evaluate_sharded`` already collects for ``util/*``). Tasks weigh the same, so these shares are
all :func:`malora.diagnostics.per_layer_task_expert` needs (its module docstring has the definitions):

    I_l = sum_t (1/T) sum_e p_l(e|t) log2(p_l(e|t) / p_l(e)),      0 <= I_l <= log2 T = H(task)

Metrics (what Tune sees and MLflow plots):

* ``routing/mi`` mean of I_l over the routed layers (bits), ``routing/mi_norm`` mean of I_l / H(task) in [0, 1]
  (0: every task routes alike; 1: each task has experts of its own);
* ``routing/mi/<group>`` and ``routing/mi_norm/<group>`` the same means over one layer group (``attn_early``,
  ``attn_late``, ``mlp_early``, ``mlp_late``: :func:`malora.diagnostics.layer_group`);
* ``routing/max_share`` the largest expert share p_l(e) of the most collapsed layer (1/E when balanced).

The per-task entropy H_l(e|t) / log E averaged over layers is ``util_entropy/<task>`` (``evaluation.metrics``),
logged as before. The record (:func:`routing_diagnostics`) keeps I_l per layer and the task x expert shares of
the most and least specialised layers, for the final plots and the study's seesaw section.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np

from malora.diagnostics import layer_count, layer_group, per_layer_task_expert, task_expert_metrics


def routing_matrices(util: Mapping[str, Mapping[str, Any]], tasks: list[str]) -> dict[str, np.ndarray]:
    """{layer: (T, E) shares, rows in ``tasks`` order} from ``util[task][layer]`` (E,); a task without the layer
    gets a zero row (left out of that layer)."""
    layers = sorted({layer for task in tasks for layer in util.get(task, {})})
    out = {}
    for layer in layers:
        size = next(len(np.asarray(util[t][layer])) for t in tasks if layer in util.get(t, {}))
        out[layer] = np.stack([np.asarray(util[t][layer], dtype=np.float64) if layer in util.get(t, {})
                               else np.zeros(size) for t in tasks])
    return out


def routing_diagnostics(util: Mapping[str, Mapping[str, Any]], tasks: list[str]
                        ) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics of the module docstring, record) of one evaluation; both empty without routed layers.

    The record: ``{"mi", "mi_norm", "max_share", "mi_by_layer": {layer: bits}, "mi_by_group": {group: bits},
    "mi_norm_by_group", "most" / "least": {"layer", "mi", "share": (T, E) list}}``, JSON-able.
    """
    matrices = routing_matrices(util, tasks)
    layers = per_layer_task_expert(matrices, tasks)
    if not layers:
        return {}, {}
    summary = task_expert_metrics(matrices, tasks)
    metrics = {"routing/mi": summary["routing_mi"], "routing/mi_norm": summary["routing_mi_norm"],
               "routing/max_share": summary["routing_max_share"]}
    depth = layer_count(list(layers))
    groups: dict[str, list[dict]] = defaultdict(list)
    for name, values in layers.items():
        groups[layer_group(name, depth)].append(values)
    by_group = {g: float(np.mean([v["mi"] for v in vs])) for g, vs in sorted(groups.items())}
    norm_by_group = {g: float(np.mean([v["mi_norm"] for v in vs])) for g, vs in sorted(groups.items())}
    metrics.update({f"routing/mi/{g}": v for g, v in by_group.items()})
    metrics.update({f"routing/mi_norm/{g}": v for g, v in norm_by_group.items()})
    ranked = sorted(layers, key=lambda name: layers[name]["mi"])

    def extreme(name: str) -> dict[str, Any]:
        return {"layer": name, "mi": layers[name]["mi"], "share": layers[name]["share"].tolist()}

    record = {"mi": metrics["routing/mi"], "mi_norm": metrics["routing/mi_norm"],
              "max_share": metrics["routing/max_share"], "mi_by_layer": {n: layers[n]["mi"] for n in layers},
              "mi_by_group": by_group, "mi_norm_by_group": norm_by_group,
              "most": extreme(ranked[-1]), "least": extreme(ranked[0])}
    return metrics, record


def trial_routing_mi(result: Mapping[str, Any]) -> dict[str, float] | None:
    """``{"mi", "mi_norm"}`` of a trial's reported result (Tune's last result or an MLflow run's metrics), None
    where the trial logged none (a LoRA trial, or a run from before these metrics)."""
    mi, norm = result.get("routing/mi"), result.get("routing/mi_norm")
    if not isinstance(mi, (int, float)) or math.isnan(mi):
        return None
    return {"mi": float(mi), "mi_norm": float(norm) if isinstance(norm, (int, float)) else float("nan")}
