"""Per-evaluation metrics of a trial: accuracies, seesaw metrics, expert utilisation; and a cross-rank sum.

Metric names (what Tune sees and MLflow plots):

* ``val/acc/<task>`` validation accuracy (``acc``), ``val/acc_norm/<task>`` (per-character normalised),
  ``val/primary/<task>`` the task's primary metric (``Task.primary_metric``: OLMES' choice in cloze, ``acc`` in
  the label formulation), ``val/mean_acc`` = mean over tasks of the primary metric (the default objective):
  every evaluation scores the val pool, and only val metrics feed Optuna, ASHA, "best" and the Pareto front;
* ``test/acc/<task>``, ``test/acc_norm/<task>``, ``test/primary/<task>``, ``test/mean_acc`` (mean primary),
  ``test_correct/<task>`` (1/0 per test item under the primary metric, in pool order) and ``test_chosen/<task>``
  (the chosen option's index per item): once per trial, on its final adapter (:func:`test_metrics`), reported
  and never chosen on;
* ``seesaw/...`` and ``delta/<task>`` from :mod:`orchestrator.evaluation.seesaw` on val against the base model's
  zero-shot val accuracy (opposite-pair fraction over the trial's evaluations), ``seesaw_prev/...`` against the
  previous evaluation;
* ``util/<task>/<group>/e<i>``: share of the token-slots routed to expert ``i``, averaged over the routed layers
  of one group (group = module name, e.g. ``q_proj``; ``q_proj_n4`` when a module's layers differ in N);
* ``util_entropy/<task>``: mean over layers of the normalised routing entropy ``H(f) / log N`` in [0, 1]
  (1 = uniform use of the experts, 0 = a single expert);
* ``val/mean_acc_history``: ``val/mean_acc`` after each evaluation so far, the first one first (a list, kept in
  the trial's checkpoint: Tune rewrites a restarted trial's ``result.json``, so this is where a resumed search
  finds the earlier evaluations; :func:`mean_acc_history`).
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from malora.diagnostics import normalised_entropy


def reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the Train workers (identity without an initialised process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def utilisation_groups(fractions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer path: fraction (N,)} -> {group: mean fraction (N,)} over the layers of each group."""
    by_module: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for path, frac in fractions.items():
        by_module[path.rsplit(".", 1)[-1]][frac.numel()].append(frac.float())
    out = {}
    for module, by_n in sorted(by_module.items()):
        for n, fracs in sorted(by_n.items()):
            out[module if len(by_n) == 1 else f"{module}_n{n}"] = torch.stack(fracs).mean(0)
    return out


def routing_entropy(fractions: dict[str, torch.Tensor]) -> float:
    """Mean over layers of H(f)/log N (layers with N = 1 or no tokens are skipped); NaN if none."""
    values = []
    for frac in fractions.values():
        total = float(frac.sum())
        if frac.numel() < 2 or total <= 0:
            continue
        values.append(float(normalised_entropy(frac.double().numpy() / total)))
    return sum(values) / len(values) if values else float("nan")


def seesaw_block(acc: dict[str, float], reference: dict[str, float] | None,
                 history: list[dict[str, float]]) -> dict[str, float]:
    """Seesaw metrics of :mod:`orchestrator.evaluation.seesaw`: against the base model (``seesaw/*``, ``delta/<task>``, with
    the opposite-pair fraction over ``history``) and against the previous evaluation (``seesaw_prev/*``)."""
    from orchestrator.evaluation import seesaw

    acc = {t: a for t, a in acc.items() if not math.isnan(a)}
    out: dict[str, float] = {}
    if reference and acc and set(acc) <= set(reference):
        ref = {t: reference[t] for t in acc}
        past = [{t: h[t] for t in acc} for h in history if set(acc) <= set(h)]
        out.update(seesaw.seesaw_metrics(acc, ref, past))
    if history and acc and set(acc) <= set(history[-1]):
        prev = seesaw.delta_summary(seesaw.task_deltas(acc, {t: history[-1][t] for t in acc}))
        out.update({f"seesaw_prev/{k}": v for k, v in prev.items()})
    return out


def _task_metrics(prefix: str, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """``<prefix>/acc/<task>``, ``<prefix>/acc_norm/<task>`` and ``<prefix>/primary/<task>``."""
    out: dict[str, float] = {}
    for task, s in scores.items():
        out.update({f"{prefix}/acc/{task}": s["acc"], f"{prefix}/acc_norm/{task}": s["acc_norm"],
                    f"{prefix}/primary/{task}": s["primary"]})
    return out


def eval_metrics(acc: dict[str, float], util: dict[str, dict[str, torch.Tensor]],
                 reference: dict[str, float] | None, history: list[dict[str, float]], *,
                 scores: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """The metrics of one evaluation (see the module docstring); ``acc`` = each task's primary metric, ``scores``
    = its acc / acc_norm / primary (without it, ``acc`` is logged as ``val/acc/<task>``)."""
    finite = [a for a in acc.values() if not math.isnan(a)]
    out: dict[str, float] = _task_metrics("val", scores) if scores else {f"val/acc/{t}": a for t, a in acc.items()}
    out["val/mean_acc"] = sum(finite) / len(finite) if finite else float("nan")
    out.update(seesaw_block(acc, reference, history))
    for task, fractions in util.items():
        if not fractions:
            continue
        out[f"util_entropy/{task}"] = routing_entropy(fractions)
        for group, frac in utilisation_groups(fractions).items():
            out.update({f"util/{task}/{group}/e{i}": float(v) for i, v in enumerate(frac.tolist())})
    return out


def test_metrics(scores: dict[str, dict[str, float]], items: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """The held-out block of a trial's final report (see the module docstring); ``scores[task]`` has ``acc``,
    ``acc_norm`` and ``primary``, ``items[task]`` the per-item ``correct`` and ``chosen`` under the primary."""
    finite = [s["primary"] for s in scores.values() if not math.isnan(s["primary"])]
    out: dict[str, Any] = _task_metrics("test", scores)
    out["test/mean_acc"] = sum(finite) / len(finite) if finite else float("nan")
    out.update({f"test_correct/{t}": list(v["correct"]) for t, v in items.items()})
    out.update({f"test_chosen/{t}": list(v["chosen"]) for t, v in items.items()})
    out.update({f"test_gold/{t}": list(v["gold"]) for t, v in items.items() if "gold" in v})
    out.update({f"test_loglik/{t}": [list(x) for x in v["loglik"]] for t, v in items.items() if "loglik" in v})
    return out


HISTORY_KEY = "val/mean_acc_history"


def mean_acc_history(results: Iterable[dict]) -> dict[int, float]:
    """Evaluation number -> ``val/mean_acc`` of one trial, from its reported results in order: each result's own
    (``evaluations``, ``val/mean_acc``) and the :data:`HISTORY_KEY` list it carries (evaluation ``i + 1`` at
    index ``i``), so evaluations whose results were lost to a restart are still there; a later result wins."""
    out: dict[int, float] = {}
    for r in results:
        for i, v in enumerate(r.get(HISTORY_KEY) or []):
            if isinstance(v, numbers.Real) and math.isfinite(v):
                out[i + 1] = float(v)
        e, v = r.get("evaluations"), r.get("val/mean_acc")
        if isinstance(e, numbers.Real) and e == e and isinstance(v, numbers.Real) and math.isfinite(v):
            out[int(e)] = float(v)
    return dict(sorted(out.items()))
