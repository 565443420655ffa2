"""The seesaw reference: the base model's zero-shot accuracy on the search's evaluation items, computed once."""

from __future__ import annotations

import json
import logging
import time

import torch

from orchestrator.cluster import storage
from orchestrator.spec.space import SearchSpec

logger = logging.getLogger(__name__)


class FormulationMismatch(ValueError):
    """Numbers scored in one formulation compared with numbers of another (refused: they measure different things)."""


def pools_sha256(spec: SearchSpec) -> dict[str, dict[str, str]]:
    """``{pool: {task: sha256 of its item keys}}`` of the val and test pools the reference scores."""
    from orchestrator.data.pools import pool_sha256
    from orchestrator.data.suites import load_pools

    pools = load_pools(spec)
    return {name: {task: pool_sha256(items) for task, items in getattr(pools, name).items()} for name in ("val", "test")}


def _formulation_of(key: dict) -> str | None:
    """The formulation a cached reference was scored in (earlier versions recorded ``options``: text = cloze)."""
    return key.get("formulation") or {"text": "cloze", "label": "label"}.get(key.get("options"))


def check_formulation(spec: SearchSpec) -> dict | None:
    """The stored ``reference.json`` of ``spec``'s search (None when there is none); raises FormulationMismatch
    when it was scored in another formulation than ``data.formulation`` (the search's trials were too)."""
    path = storage.join(spec.storage_path, spec.name, "reference.json")
    text = storage.read_text(path)
    if text is None:
        return None
    cached = json.loads(text)
    before = _formulation_of(cached.get("key") or {})
    if before is not None and before != spec.data.formulation:
        raise FormulationMismatch(
            f"{path} holds the zero-shot reference of {spec.name!r} scored in the {before} formulation, but "
            f"data.formulation is {spec.data.formulation!r}: a comparison across formulations is refused. Fix: a "
            f"new search name (--name) or storage_path, or data.formulation: {before} to continue the stored one")
    return cached


def cached_reference(spec: SearchSpec) -> dict[str, dict[str, float]]:
    """Base zero-shot accuracy ``{"val": {task: primary}, "test": {task: primary}, "test_correct": {task: [1/0...]},
    "test_chosen": {task: [option...]}, "formulation": f, ...}`` (see :func:`base_accuracy`): from
    ``<storage>/<name>/reference.json`` (a local folder or a URI) or computed once (a Ray task).

    A cached reference scored in another formulation is refused (FormulationMismatch), never recomputed over:
    the trials already stored beside it were scored in that formulation too."""
    import ray

    d = spec.data
    key = {"model": spec.model.name, "dtype": spec.model.dtype, "suite": d.suite, "tasks": list(d.tasks or ()),
           "split_seed": d.split_seed, "val_limit": d.val_limit, "test_limit": d.test_limit,
           "train_limit": d.train_limit, "scoring": spec.eval.scoring, "template": d.template,
           "formulation": d.formulation, "data_dir": d.data_dir,
           # the settings as written (auto resolves on the trials' device, which the driver may not have; the
           # reference records what it resolved to) and the items themselves, not only how they were chosen
           "precision": [spec.train.precision, spec.eval.precision], "pools_sha256": pools_sha256(spec)}
    path = storage.join(spec.storage_path, spec.name, "reference.json")
    cached = check_formulation(spec)
    if cached is not None:
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


def scoring_model(spec: SearchSpec):
    """(model, tokenizer, scoring precision, device) to score the way the trials do, outside a trial: the base
    weights the trials trained on (tiny-llama's depend on the seed; search trials use ``train.seed``), held and
    computed at the trials' resolved evaluation precision, on the device and threads a worker gets."""
    from orchestrator.models.loading import load_model
    from orchestrator.models.precision import plan_run

    if spec.resources.gpus_per_worker == 0:
        torch.set_num_threads(max(1, int(round(spec.resources.cpus_per_worker))))
    device = "cuda" if spec.resources.gpus_per_worker and torch.cuda.is_available() else "cpu"
    _, scoring = plan_run(spec.model.dtype, spec.train.precision, spec.eval.precision, device)
    model, tokenizer = load_model(spec.model.name, dtype=scoring.weights, device=device,
                                  cache_dir=spec.model.cache_dir, seed=spec.train.seed)
    return model, tokenizer, scoring, device


def base_accuracy(spec: SearchSpec) -> dict[str, dict[str, float]]:
    """Zero-shot accuracy of the base model on the search's val and test pools, in ``data.formulation``.

    ``val``/``test``: ``{task: primary metric}`` (what the trials' ``val/primary``, ``val/mean_acc`` and
    ``test/mean_acc`` compare with); ``val_scores``/``test_scores``: ``{task: {acc, acc_norm, primary}}`` (values;
    ``primary_metric``: ``{task: "acc" | "acc_norm"}``);
    ``test_correct``/``test_chosen``: per test item, 1/0 and the chosen option under the primary metric (the
    study's intervals, paired comparisons and learned-per-item check). The val numbers are the seesaw reference
    of the trials' evaluations. An adapter at initialisation leaves the model unchanged (B = 0), so val is also
    every trial's step-0 score.
    """
    from orchestrator.evaluation.accuracy import evaluate_tasks
    from orchestrator.data.suites import load_pools

    model, tokenizer, scoring, device = scoring_model(spec)
    suite = load_pools(spec)
    out: dict = {"formulation": spec.data.formulation, **scoring.record()}
    for pool in ("val", "test"):
        with scoring.context(device):
            scores = evaluate_tasks(model, tokenizer, getattr(suite, pool), scoring=spec.eval.scoring,
                                    batch_size=spec.eval.batch_size, template=spec.data.template,
                                    formulation=spec.data.formulation, max_length=spec.data.max_length)
        out[pool] = {task: s.primary_accuracy for task, s in scores.items()}
        out[f"{pool}_scores"] = {task: {"acc": s.accuracy, "acc_norm": s.accuracy_norm, "primary": s.primary_accuracy}
                                 for task, s in scores.items()}
        out["primary_metric"] = {task: s.primary for task, s in scores.items()}
        if pool == "test":  # per item, for the study's intervals, paired comparisons and learned-per-item check
            out["test_correct"] = {task: list(s.primary_correct) for task, s in scores.items()}
            out["test_chosen"] = {task: list(s.primary_chosen) for task, s in scores.items()}
            out["test_gold"] = {task: list(s.gold) for task, s in scores.items() if s.gold}
            out["test_loglik"] = {task: [list(x) for x in s.logliks] for task, s in scores.items() if s.logliks}
    return out
