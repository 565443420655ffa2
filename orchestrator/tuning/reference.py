"""The seesaw reference: the base model's zero-shot accuracy on the search's evaluation items, computed once."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


def cached_reference(spec: SearchSpec) -> dict[str, float]:
    """Base zero-shot accuracy per task: read from <storage>/<name>/reference.json or computed once (a Ray task)."""
    import ray

    key = {"model": spec.model.name, "dtype": spec.model.dtype, "suite": spec.data.suite,
           "tasks": list(spec.data.tasks or ()), "eval_limit": spec.eval.eval_limit, "scoring": spec.eval.scoring,
           "template": spec.data.template, "options": spec.eval.options, "seed": spec.train.seed,
           "data_dir": spec.data.data_dir}
    path = Path(spec.storage_path) / spec.name / "reference.json"
    if "://" not in spec.storage_path and path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["accuracy"]
    r = spec.resources
    task = ray.remote(num_cpus=max(0.01, r.cpus_per_worker - r.trial_driver_cpus),
                      num_gpus=r.gpus_per_worker)(base_accuracy)
    t0 = time.perf_counter()
    accuracy = ray.get(task.remote(spec))
    logger.info("base zero-shot accuracy %s (%.1f s)", accuracy, time.perf_counter() - t0)
    if "://" not in spec.storage_path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "accuracy": accuracy}, indent=1))
        tmp.replace(path)
    return accuracy


def base_accuracy(spec: SearchSpec) -> dict[str, float]:
    """Zero-shot accuracy of the base model on the search's evaluation items (the seesaw reference).

    An adapter at initialisation leaves the model unchanged (B = 0), so this is also every trial's step-0 score.
    """
    from orchestrator.data.tasks import load_suite
    from orchestrator.evaluation.accuracy import evaluate_tasks
    from orchestrator.models.loading import load_model

    if spec.resources.gpus_per_worker == 0:
        torch.set_num_threads(max(1, int(round(spec.resources.cpus_per_worker))))
    device = "cuda" if spec.resources.gpus_per_worker and torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(spec.model.name, dtype=spec.model.dtype, device=device,
                                  cache_dir=spec.model.cache_dir, seed=spec.train.seed)
    d = spec.data
    suite = load_suite(d.suite or list(d.tasks), d.data_dir, train_limit=d.train_limit,
                       eval_limit=spec.eval.eval_limit, seed=spec.train.seed)
    scores = evaluate_tasks(model, tokenizer, suite.eval, scoring=spec.eval.scoring,
                            batch_size=spec.eval.batch_size, template=d.template, options=spec.eval.options)
    return {task: s.accuracy for task, s in scores.items()}
