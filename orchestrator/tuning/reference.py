"""The seesaw reference: the base model's zero-shot accuracy on the search's evaluation items, computed once."""

from __future__ import annotations

import json
import logging
import time

import torch

from orchestrator.cluster import storage
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


def cached_reference(spec: SearchSpec) -> dict[str, dict[str, float]]:
    """Base zero-shot accuracy ``{"val": {task: acc}, "test": {task: acc}, "test_correct": {task: [1/0...]}}``: from
    ``<storage>/<name>/reference.json`` (a local folder or a URI) or computed once (a Ray task)."""
    import ray

    d = spec.data
    key = {"model": spec.model.name, "dtype": spec.model.dtype, "suite": d.suite, "tasks": list(d.tasks or ()),
           "split_seed": d.split_seed, "val_limit": d.val_limit, "test_limit": d.test_limit,
           "train_limit": d.train_limit, "scoring": spec.eval.scoring, "template": d.template,
           "options": spec.eval.options, "data_dir": d.data_dir}
    path = storage.join(spec.storage_path, spec.name, "reference.json")
    text = storage.read_text(path)
    if text is not None:
        cached = json.loads(text)
        if cached.get("key") == key:
            logger.info("base zero-shot accuracy from %s", path)
            return cached["accuracy"]
    r = spec.resources
    task = ray.remote(num_cpus=max(0.01, r.cpus_per_worker - r.trial_driver_cpus),
                      num_gpus=r.gpus_per_worker)(base_accuracy)
    t0 = time.perf_counter()
    accuracy = ray.get(task.remote(spec))
    logger.info("base zero-shot accuracy %s (%.1f s)", accuracy, time.perf_counter() - t0)
    storage.write_text(path, json.dumps({"key": key, "accuracy": accuracy}, indent=1))
    return accuracy


def base_accuracy(spec: SearchSpec) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of the base model on the search's val and test pools (``{"val": ..., "test": ...}``).

    The val numbers are the seesaw reference of the trials' evaluations; the test numbers are reported beside the
    trained ones. An adapter at initialisation leaves the model unchanged (B = 0), so val is also every trial's
    step-0 score.
    """
    from orchestrator.evaluation.accuracy import evaluate_tasks
    from orchestrator.training.worker import load_pools
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import plan_run

    if spec.resources.gpus_per_worker == 0:
        torch.set_num_threads(max(1, int(round(spec.resources.cpus_per_worker))))
    device = "cuda" if spec.resources.gpus_per_worker and torch.cuda.is_available() else "cpu"
    _, scoring = plan_run(spec.model.dtype, spec.train.precision, spec.eval.precision, device)  # as the trials
    model, tokenizer = load_model(spec.model.name, dtype=scoring.weights, device=device,
                                  cache_dir=spec.model.cache_dir, seed=spec.train.seed)
    suite = load_pools(spec)
    out = {}
    for pool in ("val", "test"):
        with scoring.context(device):
            scores = evaluate_tasks(model, tokenizer, getattr(suite, pool), scoring=spec.eval.scoring,
                                    batch_size=spec.eval.batch_size, template=spec.data.template,
                                    options=spec.eval.options)
        out[pool] = {task: s.accuracy for task, s in scores.items()}
        if pool == "test":  # per item, for the study's intervals and paired comparisons
            out["test_correct"] = {task: list(s.correct) for task, s in scores.items()}
    return out
