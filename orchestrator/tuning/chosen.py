"""Test after choosing: a search scores the held-out test pool only for the trials it chose, once it has chosen.

Search trials report val only (``trial_driver(score_test=False)``), so no table, live view or MLflow run shows a
test number beside a val number a user could choose by eye. Once the search is over, the best trial per method
and the Pareto front are chosen on val (``report.summary.choose``), and then each chosen trial's final adapter
(its last checkpoint, saved by the worker) is loaded into the base model and scored on test, once. The chosen
trials are dealt round-robin to as many Ray tasks as the search has trial slots (each loads the base model once
and scores its share one adapter after another), so test scoring uses the cores the trials used. Cheaper than
retraining, and the same adapter that was chosen.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.cluster import storage
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


def adapter_test_scores(spec: SearchSpec, adapters: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``{trial id: test metrics}`` (``test/acc/<task>``, ``test/mean_acc``, ``test_correct/<task>``) of the adapters
    saved at ``adapters[trial id]`` (folders on the search's storage), each scored on the test pool."""
    import torch

    from malora.checkpoint import load_adapter
    from malora.inject import remove_adapters
    from orchestrator.evaluation.metrics import test_metrics
    from orchestrator.spec.recorded import scoring_record
    from orchestrator.data.suites import load_pools
    from orchestrator.training.worker import evaluate_sharded
    from orchestrator.tuning.reference import scoring_model

    model, tokenizer, scoring, device = scoring_model(spec)
    test = load_pools(spec).test
    out = {}
    for trial_id, path in adapters.items():
        with storage.local_copy(path, root=spec.storage_path) as local:
            if local is None:
                raise FileNotFoundError(f"trial {trial_id}: no saved adapter at {path}")
            load_adapter(model, local)
        model.to(device).eval()
        # the trials' own evaluation path: the same formulation, metrics and per-item records as a study run
        with scoring.context(device):
            scores, _, items = evaluate_sharded(model, tokenizer, test, spec, 0, 1, torch.device(device))
        out[trial_id] = {**test_metrics(scores, items), **scoring_record(test, spec), **scoring.record("eval_")}
        remove_adapters(model)
    return out


def deal(adapters: dict[str, str], n: int) -> list[dict[str, str]]:
    """``adapters`` dealt round-robin into ``min(n, len(adapters))`` non-empty groups, in their order."""
    items = list(adapters.items())
    return [dict(items[i::n]) for i in range(min(max(1, n), len(items)))]


def score_chosen(spec: SearchSpec, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Score the chosen ``rows`` (each with its ``checkpoint`` folder) on test, one Ray task per trial slot;
    ``{trial id: test metrics}``."""
    import ray

    from orchestrator.training.worker import ADAPTER_DIR
    from orchestrator.tuning.plan import concurrency

    adapters = {r["trial_id"]: storage.join(r["checkpoint"], ADAPTER_DIR) for r in rows if r.get("checkpoint")}
    if not adapters:
        return {}
    r = spec.resources
    task = ray.remote(num_cpus=max(0.01, r.cpus_per_worker - r.trial_driver_cpus),
                      num_gpus=r.gpus_per_worker)(adapter_test_scores)
    groups = deal(adapters, concurrency(spec, ray.cluster_resources()))
    t0 = time.perf_counter()
    scores = {k: v for part in ray.get([task.remote(spec, g) for g in groups]) for k, v in part.items()}
    logger.info("test scored after choosing, for %d chosen trials (%.1f s): %s", len(scores),
                time.perf_counter() - t0, {k: round(v["test/mean_acc"], 4) for k, v in scores.items()})
    return scores
