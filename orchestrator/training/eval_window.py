"""A trial's evaluation: val (and at the last step test) scored sharded over the ranks, and the window's metrics."""

from __future__ import annotations

import math
from typing import Any

import torch

from orchestrator.evaluation.metrics import HISTORY_KEY, eval_metrics, reduce_sum, test_metrics
from orchestrator.spec.recorded import scoring_record
from orchestrator.evaluation.grad_conflict import Probe
from orchestrator.spec.space import SearchSpec
from orchestrator.training.diagnostics import window_diagnostics
from orchestrator.training.step import max_over_ranks, peak_memory_mb, window_pad_share
from orchestrator.training.trial import Optimisation, Progress, TrialModel, eager_scoring


def evaluate_window(trial: TrialModel, optim: Optimisation, spec: SearchSpec, session: Any, device: torch.device,
                    pools: dict[str, dict[str, list]], window: dict[str, Any], progress: Progress, *,
                    reference: dict[str, float] | None, notes: dict[str, Any], done: int, steps: int, epoch: int,
                    setup_s: float, probe: Probe | None = None) -> dict[str, Any]:
    """Evaluate on val (sharded over ranks) and build the window's metrics; at the last step also score test.

    Val metrics (``val/*``, seesaw, utilisation) are what every choice reads; ``test/acc/<task>``,
    ``test/mean_acc``, the per-item ``test_correct/<task>`` and ``test_sha256/<task>`` (the items they were scored
    on, ``orchestrator.spec.recorded``) appear once, in the final report, and are never
    read by Optuna, ASHA or "best" (``orchestrator.spec.space`` refuses them as objectives).
    ``val_correct/<task>`` (1/0 per val item) lets two trials be compared on the same val items.
    ``progress.history`` gets the val accuracies (the previous-evaluation seesaw view; checkpointed), and
    ``val/mean_acc_history`` reports their means, evaluation 1 first. The seesaw diagnostics
    (``routing/*``, ``grad_conflict/*``, ``grad_cos/*`` and the ``diagnostics`` record) come from
    :mod:`orchestrator.training.diagnostics`, the gradient conflict on ``probe``.
    """
    rank, world = session.rank, session.world_size
    rank_tokens = reduce_sum([float(window["tokens"]) if r == rank else 0.0 for r in range(world)], device)
    window_time = max_over_ranks(window["time"], rank, world, device)  # the slowest rank sets the pace
    progress.tokens += int(sum(rank_tokens))
    with trial.eval_precision.context(device.type), eager_scoring():
        scores, util, val_items = evaluate_sharded(trial.model, trial.tokenizer, pools["val"], spec, rank, world,
                                                   device)
        acc = {task: s["primary"] for task, s in scores.items()}  # each task's primary metric: what choices read
        test = {}
        if done == steps and pools["test"]:
            test_scores, _, test_items = evaluate_sharded(trial.model, trial.tokenizer, pools["test"], spec, rank,
                                                          world, device)
            test = test_metrics(test_scores, test_items)
            test.update(scoring_record(pools["test"], spec))  # the items and formulation these scores belong to
    diagnostics = window_diagnostics(trial, probe, util, list(pools["val"]), rank, device)
    loss_sum = reduce_sum([window["loss"], window["aux"], float(window["micro"])], device)
    if world > 1:  # DDP keeps replicas identical: the spread of the adapter checksums across ranks is 0
        checksum = float(sum(p.detach().double().sum() for p in optim.params))
        sums = reduce_sum([checksum if r == rank else 0.0 for r in range(world)], device)
        divergence = {"ddp_param_divergence": max(sums) - min(sums)}
    else:
        divergence = {}
    counts = trial.counts
    metrics = {
        "step": done, "total_steps": steps, "evaluations": evaluations_done(done, spec.eval.every_n_steps),
        "epoch": epoch, "lr": optim.scheduler.get_last_lr()[0],
        "train_loss": loss_sum[0] / max(1.0, loss_sum[2]), "balance_loss": loss_sum[1] / max(1.0, loss_sum[2]),
        "tokens_per_s": sum(rank_tokens) / max(window_time, 1e-9), "pad_share": window_pad_share(window, device),
        "step_time_s": window_time / max(1, window["steps"]),
        "peak_memory_mb": max_over_ranks(peak_memory_mb(device), rank, world, device),
        "tokens_total": progress.tokens, "world_size": world, "setup_s": setup_s,
        "trainable_params": counts.trainable, "total_params": counts.total, "trainable_share": counts.share,
        "train_examples": notes["train_examples"], "dropped_too_long": notes["dropped_too_long"],
        **{f"tokens_rank/{r}": int(t) for r, t in enumerate(rank_tokens)},
        **divergence, **eval_metrics(acc, util, reference, progress.history, scores=scores), **test, **diagnostics,
        # per val item, 1/0 under the primary metric in val pool order: the search report's paired ties
        **{f"val_correct/{t}": list(v["correct"]) for t, v in val_items.items()},
        **trial.precision.record(), **trial.eval_precision.record("eval_"),
        "val/best_mean_acc": max([mean_of(acc), *map(mean_of, progress.history)]),
        # val mean accuracy after each evaluation so far, this one last: Tune rewrites a restarted trial's
        # result.json, so a resumed search's ASHA rungs and report read the earlier evaluations from here
        HISTORY_KEY: [*map(mean_of, progress.history), mean_of(acc)],
    }
    progress.history.append(acc)
    return metrics


def mean_of(acc: dict[str, float]) -> float:
    """Mean over tasks of one evaluation's accuracies, NaN-tasks left out (as ``val/mean_acc``)."""
    finite = [a for a in acc.values() if not math.isnan(a)]
    return sum(finite) / len(finite) if finite else float("nan")


def evaluations_done(step: int, every_n_steps: int) -> int:
    """Evaluations a trial has reported once it is at ``step``: one every ``every_n_steps`` steps and one at the
    end (a last, partial window counts as one), i.e. ceil(step / every_n_steps). ASHA's time attribute: it
    comes from the training step, so a restarted or resumed trial keeps its rung (Tune's training_iteration
    restarts at 1)."""
    return -(-step // every_n_steps)


def _gather_logliks(items: list, mine: tuple, rank: int, world: int, device: torch.device) -> list[list[float]]:
    """Every item's per-option log-likelihoods (in item order) from the ranks' shards ``items[rank::world]``: one
    flat vector with each item's options at fixed offsets, this rank's filled, summed over the ranks. An item
    that could not be scored has NaN options."""
    sizes = [len(ex.choices) for ex in items]
    starts = [sum(sizes[:i]) for i in range(len(items))]
    flat = [0.0] * sum(sizes)
    for k, scores in zip(range(rank, len(items), world), mine):
        for j in range(sizes[k]):
            flat[starts[k] + j] = float(scores[j]) if scores else float("nan")
    flat = reduce_sum(flat, device) if world > 1 else flat
    return [list(flat[a:a + n]) for a, n in zip(starts, sizes)]


def evaluate_sharded(model: torch.nn.Module, tokenizer: Any, eval_by_task: dict[str, list], spec: SearchSpec,
                     rank: int, world: int, device: torch.device
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict], dict[str, dict[str, list[int]]]]:
    """Per-task accuracy and routing fractions, each rank scoring items[rank::world], summed over ranks.

    Routing: every rank's raw token-slot counts per expert are summed over the ranks and then normalised, so the
    share is exact over all real tokens (not a per-rank share weighted by items).
    Returns ({task: {"acc", "acc_norm", "primary"}}, {task: {layer path: fraction (N,) of token-slots per
    expert}}, {task: {"correct": 1/0, "chosen": option index}} per item in the order of ``eval_by_task[task]``,
    both under the task's primary metric, and where scored by log-likelihood "gold" and "loglik" (every option's
    log-likelihood)). ``acc_norm`` is NaN where items are generated.
    """
    from malora.inject import reset_routing_stats, routing_stats
    from orchestrator.data.tasks import get_task
    from orchestrator.evaluation.accuracy import evaluate_tasks

    model.eval()
    sizes = {name: frac.numel() for name, frac in routing_stats(model).items()}  # routed layer -> N
    names = sorted(sizes)
    formulation = spec.data.formulation
    acc, util, per_item = {}, {}, {}
    with torch.no_grad():
        for task, items in eval_by_task.items():
            shard = items[rank::world]
            reset_routing_stats(model)
            correct, correct_norm, n, counts = 0.0, 0.0, 0, {}
            hits, chosen = [0.0] * len(items), [0.0] * len(items)
            loglik = spec.eval.scoring == "loglik" and get_task(task).scoring != "number"
            primary = get_task(task).primary_metric(formulation) if loglik else "acc"
            if shard:
                score = evaluate_tasks(model, tokenizer, {task: shard}, scoring=spec.eval.scoring,
                                       batch_size=spec.eval.batch_size, template=spec.data.template,
                                       formulation=formulation, max_length=spec.data.max_length)[task]
                correct, n = score.accuracy * score.n, score.n
                correct_norm = (score.accuracy_norm or 0.0) * score.n
                counts = routing_stats(model, counts=True)
                hits[rank::world] = [float(h) for h in score.primary_correct]
                chosen[rank::world] = [float(c) for c in score.primary_chosen]
            # one vector per rank: [correct, correct_norm, n, token-slot counts of every routed layer, this rank's
            # item hits and chosen options], summed over the ranks (every item position is filled by exactly one rank)
            vec = [correct, correct_norm, float(n)] + [float(x) for name in names for x in counts.get(
                name, torch.zeros(sizes[name])).tolist()] + hits + chosen
            vec = reduce_sum(vec, device) if world > 1 else vec
            total, pos, util[task] = vec[2], 3, {}
            for name in names:
                slots = torch.tensor(vec[pos:pos + sizes[name]], dtype=torch.float64)
                util[task][name] = slots / slots.sum().clamp_min(1.0)
                pos += sizes[name]
            per_item[task] = {"correct": [int(round(h)) for h in vec[pos:pos + len(items)]],
                              "chosen": [int(round(c)) for c in vec[pos + len(items):]]}
            if loglik and all(ex.choices for ex in items):   # gold, and every option's log-likelihood: kept
                per_item[task]["gold"] = [int(ex.answer_index) for ex in items]
                per_item[task]["loglik"] = _gather_logliks(items, score.logliks if shard else (), rank, world,
                                                           device)
            a = vec[0] / total if total else float("nan")
            a_norm = vec[1] / total if total and loglik else float("nan")
            acc[task] = {"acc": a, "acc_norm": a_norm, "primary": a_norm if primary == "acc_norm" else a}
    reset_routing_stats(model)
    return acc, util, per_item
