"""One trial's Ray Train worker loop (DDP over ``workers_per_trial`` ranks); the Tune side is ``training.driver``.

``train_worker(config)`` runs in every Train worker: load the model, inject the trial's adapter, build the mixed
multi-task stream, and train with AdamW, linear warm-up then cosine/linear decay, gradient accumulation and the
objective ``L = CE(response tokens) + sum_layers balance_coef * N * sum_i f_i P_i``. Every ``eval.every_n_steps``
(and at the end) it evaluates sharded over the ranks, reports metrics with ``ray.train.report`` and a checkpoint
holding the adapter (``malora.save_adapter``) plus the optimizer state, from which a restarted worker group
(``FailureConfig``) or a resumed search continues.

DDP choice: experts are stacked tensors (``lora_B`` of shape (N, m, r), ...), so each parameter *tensor* gets a
gradient on every step even when some expert received no token (its slice of the gradient is zero). DDP
therefore runs with ``find_unused_parameters=False`` -- no extra autograd-graph traversal per step -- and
gradient accumulation skips the all-reduce with ``no_sync()`` on all but the last micro-batch.

``run_training(spec, trial_config, session)`` is the same loop without Ray (``LocalSession``), used by the
orchestration-overhead benchmark and by tests.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from orchestrator.data.suites import load_pools
from orchestrator.models.precision import FP32
from orchestrator.spec.space import SearchSpec
from orchestrator.training.checkpoints import (ADAPTER_DIR, TRAIN_STATE, checkpoint_and_report, report_final_again,
                                               restore_progress, save_partial)
from orchestrator.training.diagnostics import trial_probe
from orchestrator.training.eval_window import evaluate_sharded, evaluate_window, evaluations_done, mean_of
from orchestrator.training.sessions import LocalSession, RaySession, no_buffer_sync
from orchestrator.training.step import (debug_kill, max_over_ranks, new_window, peak_memory_mb, progress_line,
                                        synchronize, train_step, window_pad_share)
from orchestrator.training.trial import (Optimisation, Progress, TrialModel, build_optimisation, build_trial_model,
                                         eager_scoring, training_loss)
from orchestrator.training.trial_data import batches, build_training_data, resume_stream, total_steps

__all__ = [  # the loop's parts, importable from here as before the split
    "ADAPTER_DIR", "FP32", "LocalSession", "Optimisation", "Progress", "RaySession", "TRAIN_STATE", "TrialModel",
    "batches", "build_optimisation", "build_trial_model", "build_training_data", "checkpoint_and_report",
    "eager_scoring", "evaluate_sharded", "evaluate_window", "evaluations_done", "max_over_ranks",
    "mean_of", "new_window", "no_buffer_sync", "peak_memory_mb", "progress_line", "report_final_again",
    "restore_progress", "resume_stream", "run_training", "synchronize", "total_steps", "train_step",
    "train_worker", "training_loss", "window_pad_share",
]

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 60.0  # a progress line this often between evaluations (rank 0)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` = {spec, trial (Tune config), trial_id, reference}."""
    run_training(config["spec"], config["trial"], RaySession(), reference=config.get("reference"),
                 trial_id=config.get("trial_id", ""), score_test=config.get("score_test", True))


def run_training(spec: SearchSpec, trial_config: dict[str, Any], session: Any, *,
                 reference: dict[str, float] | None = None, trial_id: str = "",
                 score_test: bool = True) -> list[dict[str, Any]]:
    """Train one trial and report at every evaluation; returns rank 0's metric dicts (LocalSession: all).
    ``score_test`` false: no test items are scored (a search trial; tests are scored after choosing)."""
    t_setup = time.perf_counter()
    device = session.device()
    trial = build_trial_model(spec, trial_config, device)
    encoded, pools, notes = build_training_data(spec, trial.tokenizer)
    pools = pools if score_test else {**pools, "test": {}}
    steps = total_steps(spec, len(encoded), session.world_size)
    optim = build_optimisation(trial, spec, steps)
    partial = session.partial_store() if spec.resources.checkpoint_every_min > 0 else None
    progress = restore_progress(session, trial.model, optim, device, trial_id, partial=partial,
                                trial_config=trial_config, steps=steps)
    if progress.step >= steps:  # killed after its last checkpoint: the training is done, say so again
        if partial is not None and session.rank == 0:
            partial.clear()  # a state the kill left before the last checkpoint's clear
        return report_final_again(session, trial_id)
    probe = trial_probe(spec, trial, load_pools(spec).train)  # the same items at every evaluation and resume
    ddp = session.prepare(training_loss(trial.model))  # DDP wraps the loss module, so it all-reduces its grads
    stream = resume_stream(encoded, spec, session, trial.tokenizer, progress.step)
    setup_s = time.perf_counter() - t_setup
    window, out, epoch = progress.window or new_window(device), [], 0
    last_line = last_save = time.monotonic()
    started_at = progress.step
    for step in range(progress.step, steps):
        debug_kill(spec, trial.method, step, started_at)
        epoch = train_step(ddp, trial, optim, stream, spec, session.world_size, step, window, device)
        done = step + 1
        if session.rank == 0 and time.monotonic() - last_line >= PROGRESS_EVERY_S:
            logger.info("%s", progress_line(trial_id, done, steps, window, session.world_size))
            last_line = time.monotonic()
        if done % spec.eval.every_n_steps and done != steps:
            if partial is not None:
                due = time.monotonic() - last_save >= 60 * spec.resources.checkpoint_every_min
                # every rank saves at the same step: rank 0's clock decides
                if max_over_ranks(float(due and session.rank == 0), session.rank, session.world_size, device):
                    save_partial(session, partial, trial, optim, done, progress.tokens, progress.history, window,
                                 trial_config, steps)
                    last_save = time.monotonic()
            continue
        metrics = evaluate_window(trial, optim, spec, session, device, pools, window, progress,
                                  reference=reference, notes=notes, done=done, steps=steps, epoch=epoch,
                                  setup_s=setup_s, probe=probe)
        progress.step = done
        checkpoint_and_report(session, trial, optim, progress, metrics, out)
        if partial is not None and session.rank == 0:
            partial.clear()  # the checkpoint is at least as new
        window, last_save = new_window(device), time.monotonic()
    return out
