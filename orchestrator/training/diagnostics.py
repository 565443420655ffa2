"""A trial's seesaw diagnostics at each evaluation: expert specialisation per task and gradient conflict.

* Routing (``orchestrator.evaluation.routing_metrics``): from the val routing shares every evaluation already
  collects; no extra forward. Routed methods only.
* Gradient conflict (``orchestrator.evaluation.grad_conflict``): one forward and backward per task on the trial's
  probe (``eval.probe_items`` train items per task, drawn with ``data.split_seed``), on rank 0 only (the replicas
  are identical). ``eval.grad_conflict: false`` turns it off; a one-task run has none.

Both go into the reported metrics (numbers: what Tune and MLflow see) and, as one JSON string, into
``metrics["diagnostics"]`` (``orchestrator.evaluation.diagnostics_record``). The MLflow callback draws the final
evaluation's plots from it, and a study reads it per run for its seesaw section
(``orchestrator.report.seesaw_report``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from orchestrator.evaluation.diagnostics_record import DIAGNOSTICS_KEY, diagnostics_record
from orchestrator.evaluation.grad_conflict import Probe, build_probe, conflict_diagnostics
from orchestrator.evaluation.routing_metrics import routing_diagnostics
from orchestrator.spec.space import SearchSpec
from orchestrator.training.trial import TrialModel, eager_scoring

logger = logging.getLogger(__name__)


def trial_probe(spec: SearchSpec, trial: TrialModel, train: dict[str, list]) -> Probe | None:
    """The trial's gradient-conflict probe from its train pools (None when switched off or with one task)."""
    from orchestrator.training.trial_data import encode_training_example

    if not spec.eval.grad_conflict:
        return None
    tok = trial.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    probe = build_probe(train, lambda task, ex: encode_training_example(tok, task, ex, spec.data),
                        spec.eval.probe_items, spec.data.split_seed, pad_id)
    if probe is not None:
        logger.info("gradient-conflict probe: %s items of %d tasks (seed %d)",
                    {t: len(k) for t, k in probe.keys.items()}, len(probe.keys), probe.seed)
    return probe


def window_diagnostics(trial: TrialModel, probe: Probe | None, util: dict[str, dict[str, Any]], tasks: list[str],
                       rank: int, device: torch.device) -> dict[str, Any]:
    """The evaluation's diagnostic metrics plus :data:`DIAGNOSTICS_KEY` (see the module docstring)."""
    from orchestrator.training.loss import ResponseLoss

    metrics, routing = routing_diagnostics(util, tasks) if len(tasks) > 1 else ({}, {})
    conflict: dict[str, Any] = {}
    if probe is not None and rank == 0:
        with trial.precision.context(device.type), eager_scoring():
            numbers, conflict = conflict_diagnostics(trial.model, probe, device,
                                                     lambda model, batch: ResponseLoss(model)(**batch))
        metrics.update(numbers)
    metrics[DIAGNOSTICS_KEY] = diagnostics_record(tasks, routing, conflict)
    return metrics
