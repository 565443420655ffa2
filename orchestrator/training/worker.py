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

import contextlib
import functools
import json
import logging
import math
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.spec.hparams import adapter_config, schedule_factor, trial_hparams
from orchestrator.evaluation.metrics import eval_metrics, reduce_sum, test_metrics
from orchestrator.training.chunks import token_chunks
from orchestrator.models.precision import FP32, Precision, keep_freed_memory, plan_run
from orchestrator.spec.recorded import scoring_record
from orchestrator.spec.space import DataSpec, SearchSpec

logger = logging.getLogger(__name__)
TRAIN_STATE = "train_state.pt"
PROGRESS_EVERY_S = 60.0  # a progress line this often between evaluations (rank 0)
ADAPTER_DIR = "adapter"


# ----------------------------------------------------------------------------------------------- sessions
class LocalSession:
    """Single-process stand-in for a Ray Train worker session (rank 0 of 1); keeps every report."""

    rank, world_size = 0, 1

    def __init__(self, resume_dir: str | None = None, keep_checkpoints: str | None = None):
        self.reports: list[dict[str, Any]] = []
        self.resume_dir, self.keep = resume_dir, keep_checkpoints

    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def checkpoint_dir(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(self.resume_dir)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device())

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if ckpt_dir and self.keep:
            import shutil
            shutil.copytree(ckpt_dir, Path(self.keep) / f"step_{metrics['step']:06d}", dirs_exist_ok=True)


class RaySession:
    """The Ray Train V2 worker session: rank, device, DDP wrapping, reports and the restored checkpoint."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def checkpoint_dir(self) -> contextlib.AbstractContextManager:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else contextlib.nullcontext(None)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        # stacked experts: no unused parameter tensors; buffers (rotary tables, per-rank routing counts) are not
        # synchronised on every forward
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs={
            "find_unused_parameters": False, **no_buffer_sync()})

    def report(self, metrics: dict[str, Any], ckpt_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def no_buffer_sync() -> dict[str, bool]:
    """DDP kwarg that skips the per-forward buffer broadcast (``forward_sync_buffers`` from torch 2.13 on)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` = {spec, trial (Tune config), trial_id, reference}."""
    run_training(config["spec"], config["trial"], RaySession(), reference=config.get("reference"),
                 trial_id=config.get("trial_id", ""), score_test=config.get("score_test", True))


# ----------------------------------------------------------------------------------------------- data
def load_pools(spec: SearchSpec):
    """The spec's suite: train/val/test pools per task, fixed by ``data.split_seed`` (not by ``train.seed``).

    Loaded once per data spec in a process: the driver asks for it several times (preflight, the recorded
    splits, a study's plan and report), about a second each for the intra-domain files. Callers only read it.
    """
    return _pools_for(spec.data)


@functools.lru_cache(maxsize=4)
def _pools_for(d: DataSpec):
    from orchestrator.data.tasks import load_suite

    return load_suite(d.suite or list(d.tasks), d.data_dir, train_limit=d.train_limit, val_limit=d.val_limit,
                      test_limit=d.test_limit, split_seed=d.split_seed)


def build_training_data(spec: SearchSpec, tokenizer: Any) -> tuple[list[dict], dict[str, dict], dict[str, Any]]:
    """(encoded training examples, ``{"val": {task: items}, "test": {task: items}}``, data notes), the same on
    every rank. ``train.seed`` only shuffles the mixed stream; the pools come from ``data.split_seed``."""
    from orchestrator.data.cloze import encode_cloze_example
    from orchestrator.data.mixing import mix_examples
    from orchestrator.data.tasks import get_task
    from orchestrator.data.tokenize import encode_example

    d = spec.data
    suite = load_pools(spec)
    mixed = mix_examples(suite.train, d.mixing, temperature=d.mixing_temperature,
                         num_examples=d.num_train_examples, seed=spec.train.seed)
    encoded, dropped = [], 0
    for task, ex in mixed:
        if d.formulation == "cloze" and ex.choices:  # the scorer's row of the gold option (orchestrator.data.cloze)
            enc = encode_cloze_example(tokenizer, get_task(task), ex, max_length=d.max_length)
        else:
            enc = encode_example(tokenizer, ex, template=d.template, max_length=d.max_length)
        if enc is None:
            dropped += 1
        else:
            encoded.append(enc)
    if not encoded:
        raise ValueError(f"no training example fits data.max_length={d.max_length} ({dropped} dropped); raise it")
    notes = {"train_examples": len(encoded), "dropped_too_long": dropped, **dict(getattr(suite, "notes", {}))}
    return encoded, {"val": dict(suite.val), "test": dict(suite.test)}, notes


def batches(encoded: list[dict], batch_size: int, rank: int, world: int, seed: int, pad_id: int, *,
            group_by_length: bool = False, start: int = 0):
    """Endless micro-batches of this rank's shard; a new shuffle (seed + epoch) per pass. Yields (epoch, batch).

    Length-grouped or the plain shuffle (``orchestrator.data.batching``); the first ``start`` micro-batches are
    skipped as index lists, without collating them.
    """
    from orchestrator.data.batching import batch_stream

    return batch_stream(encoded, batch_size, rank, world, seed, pad_id, group_by_length=group_by_length,
                        start=start)


def total_steps(spec: SearchSpec, num_examples: int, world: int) -> int:
    if spec.train.max_steps is not None:
        return spec.train.max_steps
    per_step = spec.train.batch_size * spec.train.grad_accum * world
    return max(1, math.ceil(spec.train.epochs * num_examples / per_step))


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: on CUDA the window's peak allocation (the counter is reset when a window
    starts, see :func:`new_window`); on CPU the process's peak RSS so far (Linux cannot reset it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that a wall-clock timer read next measures the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_ranks(value: float, rank: int, world: int, device: torch.device) -> float:
    """The largest ``value`` over the ranks (each rank's value in its own slot of a summed vector)."""
    return max(reduce_sum([value if r == rank else 0.0 for r in range(world)], device)) if world > 1 else value


# ----------------------------------------------------------------------------------------------- loop
@dataclass
class TrialModel:
    """The base model with the trial's adapter injected (on ``device``), and what describes it."""

    model: torch.nn.Module
    tokenizer: Any
    method: str
    hparams: dict[str, Any]
    adapter: Any          # the malora adapter config
    counts: Any           # malora.params.ParamCounts
    precision: Precision = FP32        # training's, resolved on the device (orchestrator.models.precision)
    eval_precision: Precision = FP32   # scoring's, on the weights training holds


@dataclass
class Optimisation:
    """AdamW over the trainable (adapter) tensors, its LR schedule and the fp16 loss scaler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any


@dataclass
class Progress:
    """Where a trial stands: optimizer steps done, real tokens seen, and the accuracies of earlier evaluations."""

    step: int = 0
    tokens: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def new_window(device: torch.device | None = None) -> dict[str, Any]:
    """Accumulators of one reporting window (the steps between two evaluations); on CUDA also restarts the
    peak-memory counter, so each window reports its own peak (evaluation included)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return {"loss": 0.0, "aux": 0.0, "micro": 0, "tokens": 0, "time": 0.0, "steps": 0}


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
    progress = restore_progress(session, trial.model, optim, device, trial_id)
    if progress.step >= steps:  # killed after its last checkpoint: the training is done, say so again
        return report_final_again(session, trial_id)
    ddp = session.prepare(training_loss(trial.model))  # DDP wraps the loss module, so it all-reduces its grads
    stream = resume_stream(encoded, spec, session, trial.tokenizer, progress.step)
    setup_s = time.perf_counter() - t_setup
    window, out, epoch = new_window(device), [], 0
    last_line = time.monotonic()
    for step in range(progress.step, steps):
        epoch = train_step(ddp, trial, optim, stream, spec, session.world_size, step, window, device)
        done = step + 1
        if session.rank == 0 and time.monotonic() - last_line >= PROGRESS_EVERY_S:
            logger.info("%s", progress_line(trial_id, done, steps, window, session.world_size))
            last_line = time.monotonic()
        if done % spec.eval.every_n_steps and done != steps:
            continue
        metrics = evaluate_window(trial, optim, spec, session, device, pools, window, progress,
                                  reference=reference, notes=notes, done=done, steps=steps, epoch=epoch,
                                  setup_s=setup_s)
        progress.step = done
        checkpoint_and_report(session, trial, optim, progress, metrics, out)
        window = new_window(device)
    return out


def progress_line(trial_id: str, done: int, steps: int, window: dict[str, Any], world: int) -> str:
    """One line between two evaluations: steps done, this window's tokens/s (rank 0 x ranks), time left."""
    per_step = window["time"] / max(1, window["steps"])
    eta = (steps - done) * per_step
    tokens_per_s = world * window["tokens"] / max(window["time"], 1e-9)
    return (f"trial {trial_id or '-'}: step {done}/{steps}, {tokens_per_s:.0f} tokens/s, "
            f"{per_step:.2f} s/step, ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")


def build_trial_model(spec: SearchSpec, trial_config: dict[str, Any], device: torch.device) -> TrialModel:
    """Load the base model (seeded), inject the adapter that ``trial_config`` describes, move it to ``device``."""
    from malora.inject import inject_adapters
    from malora.params import count_parameters
    from orchestrator.models.loading import load_model

    if device.type == "cpu":
        torch.set_num_threads(max(1, int(round(spec.resources.cpus_per_worker))))
        keep_freed_memory()  # no fresh zero-filled pages for every step's activations
    precision, eval_precision = plan_run(spec.model.dtype, spec.train.precision, spec.eval.precision, device)
    logger.info("precision: train %s, eval %s (%s)", precision.name, eval_precision.name, precision.reason)
    torch.manual_seed(spec.train.seed)
    model, tokenizer = load_model(spec.model.name, dtype=precision.weights, device=str(device),
                                  cache_dir=spec.model.cache_dir, seed=spec.train.seed)
    method, hp = trial_hparams(spec.methods, trial_config)
    cfg = adapter_config(method, hp, num_layers=getattr(model.config, "num_hidden_layers", None))
    inject_adapters(model, cfg)
    model.to(device)
    if spec.train.compile:
        from malora.compile import compile_blocks

        logger.info("torch.compile: %d decoder blocks (compiled at the first step)", len(compile_blocks(model)))
    return TrialModel(model, tokenizer, method, hp, cfg, count_parameters(model), precision, eval_precision)


def build_optimisation(trial: TrialModel, spec: SearchSpec, steps: int) -> Optimisation:
    """AdamW (trial's lr/weight decay, else the spec's) with linear warm-up then the spec's decay schedule."""
    train, hp = spec.train, trial.hparams
    lr, wd = hp.get("lr", train.lr), hp.get("weight_decay", train.weight_decay)
    warmup = int(round(hp.get("warmup_ratio", train.warmup_ratio) * steps))
    params = [p for p in trial.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule_factor(s, steps, warmup, train.schedule))
    device_type = next(trial.model.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=train.precision == "fp16")  # fp16 needs loss scaling
    return Optimisation(params, opt, sched, scaler)


def restore_progress(session: Any, model: torch.nn.Module, optim: Optimisation, device: torch.device,
                     trial_id: str = "") -> Progress:
    """Load adapter, optimizer and schedule from the session's checkpoint, if it holds one; else start at 0."""
    with session.checkpoint_dir() as ckpt:
        if not ckpt or not (Path(ckpt) / TRAIN_STATE).is_file():
            return Progress()
        state = torch.load(Path(ckpt) / TRAIN_STATE, map_location=device, weights_only=False)
        missing = set(state["adapter"]) ^ {n for n, p in model.named_parameters() if p.requires_grad}
        if missing:
            raise RuntimeError(f"checkpoint {ckpt} does not match the adapter: {sorted(missing)[:5]}")
        model.load_state_dict(state["adapter"], strict=False)
        optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        logger.info("trial %s resumes at step %d from %s", trial_id, state["step"], ckpt)
        return Progress(state["step"], state["tokens"], state.get("history", []))


def report_final_again(session: Any, trial_id: str = "") -> list[dict[str, Any]]:
    """Re-report the final metrics (and checkpoint) of a trial whose training had finished before a kill.

    Tune had not recorded the trial's end (the driver died between the last checkpoint and the trial's
    completion), so the restarted worker must report once more, or the trial would end without its final,
    test-scored result. Every rank reports (Train requires it); rank 0 attaches a copy of the checkpoint.
    """
    import shutil

    with session.checkpoint_dir() as ckpt:
        metrics = json.loads((Path(ckpt) / "metrics.json").read_text())
        logger.info("trial %s had finished (step %d); reporting its final metrics again", trial_id, metrics["step"])
        with tempfile.TemporaryDirectory(prefix="malora-ckpt-") as tmp:
            ckpt_dir = None
            if session.rank == 0:
                shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
    return [metrics] if session.rank == 0 else []


def resume_stream(encoded: list[dict], spec: SearchSpec, session: Any, tokenizer: Any, start_step: int):
    """This rank's micro-batch stream, advanced past the ``start_step * grad_accum`` micro-batches already used."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # a resumed run continues the same deterministic stream: the used micro-batches are skipped, not collated
    return batches(encoded, spec.train.batch_size, session.rank, session.world_size, spec.train.seed, pad_id,
                   group_by_length=spec.train.group_by_length, start=start_step * spec.train.grad_accum)


def training_loss(model: torch.nn.Module) -> torch.nn.Module:
    """The module the session prepares (DDP wraps): the LM loss with the head at response positions only."""
    from orchestrator.training.loss import ResponseLoss

    return ResponseLoss(model)


def window_pad_share(window: dict[str, Any], device: torch.device) -> float:
    """Share of the window's micro-batch positions, over all ranks, that were padding: 1 - tokens / (B * T)."""
    tokens, positions = reduce_sum([float(window["tokens"]), float(window.get("positions", 0))], device)
    return 1.0 - tokens / positions if positions else 0.0


def train_step(ddp: torch.nn.Module, trial: TrialModel, optim: Optimisation, stream, spec: SearchSpec, world: int,
               step: int, window: dict[str, Any], device: torch.device) -> int:
    """One optimizer step over ``grad_accum`` micro-batches of ``L = CE + balance loss``; returns the data epoch.

    A micro-batch above ``train.max_batch_tokens`` padded positions runs as row chunks with token-share weights
    (``orchestrator.training.chunks``: the same gradient, a bounded activation peak). DDP all-reduces only on the
    last forward of the step (``no_sync`` before); ``window`` accumulates losses and tokens.
    """
    from malora.inject import collect_aux_loss

    train = spec.train
    autocast = trial.precision.context(device.type)  # autocast only over float32-held weights
    fail = spec.debug.fail_method == trial.method
    ddp.train()
    synchronize(device)  # the previous step's kernels are not this step's time
    t0 = time.perf_counter()
    epoch = 0
    for micro in range(train.grad_accum):
        epoch, batch = next(stream)
        pieces = token_chunks(batch, train.max_batch_tokens)  # one piece unless the batch is above the cap
        for i, (piece, weight) in enumerate(pieces):
            piece = {k: v.to(device) for k, v in piece.items()}
            sync = world == 1 or (micro == train.grad_accum - 1 and i == len(pieces) - 1)
            with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                out = ddp(**piece)
                lm_loss = out if torch.is_tensor(out) else out.loss  # ResponseLoss: L; a bare HF model: an output
                aux = collect_aux_loss(trial.model)
                loss = lm_loss + aux
                if fail and step + 1 == spec.debug.fail_at_step:
                    if spec.debug.fail_mode == "raise":
                        raise RuntimeError(f"debug.fail_method={trial.method!r}: failing on purpose at step {step + 1}")
                    loss = loss * float("nan")
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1} "
                                             f"(lm {lm_loss.item():.4g}, balance {aux.item():.4g}); lower the lr")
                optim.scaler.scale(loss * (weight / train.grad_accum)).backward()
            window["loss"] += weight * lm_loss.item()
            window["aux"] += weight * aux.item()
            window["tokens"] += int(piece["attention_mask"].sum())
            window["positions"] = window.get("positions", 0) + piece["attention_mask"].numel()
        window["micro"] += 1
    if train.max_grad_norm:
        optim.scaler.unscale_(optim.optimizer)
        torch.nn.utils.clip_grad_norm_(optim.params, train.max_grad_norm)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.scheduler.step()
    optim.optimizer.zero_grad(set_to_none=True)
    synchronize(device)  # CUDA runs asynchronously: without it the timer stops before the step's kernels end
    window["time"] += time.perf_counter() - t0
    window["steps"] += 1
    return epoch


def eager_scoring() -> contextlib.AbstractContextManager:
    """Scoring runs compiled blocks (``train.compile``) eagerly: under no_grad they would compile a second time,
    for a few hundred items a window; a no-op on a model without compiled modules (and on a torch before 2.6,
    which has no stances: there scoring compiles once more)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def evaluate_window(trial: TrialModel, optim: Optimisation, spec: SearchSpec, session: Any, device: torch.device,
                    pools: dict[str, dict[str, list]], window: dict[str, Any], progress: Progress, *,
                    reference: dict[str, float] | None, notes: dict[str, Any], done: int, steps: int, epoch: int,
                    setup_s: float) -> dict[str, Any]:
    """Evaluate on val (sharded over ranks) and build the window's metrics; at the last step also score test.

    Val metrics (``val/*``, seesaw, utilisation) are what every choice reads; ``test/acc/<task>``,
    ``test/mean_acc``, the per-item ``test_correct/<task>`` and ``test_sha256/<task>`` (the items they were scored
    on, ``orchestrator.spec.recorded``) appear once, in the final report, and are never
    read by Optuna, ASHA or "best" (``orchestrator.spec.space`` refuses them as objectives).
    ``progress.history`` gets the val accuracies (the previous-evaluation seesaw view).
    """
    rank, world = session.rank, session.world_size
    rank_tokens = reduce_sum([float(window["tokens"]) if r == rank else 0.0 for r in range(world)], device)
    window_time = max_over_ranks(window["time"], rank, world, device)  # the slowest rank sets the pace
    progress.tokens += int(sum(rank_tokens))
    with trial.eval_precision.context(device.type), eager_scoring():
        scores, util, _ = evaluate_sharded(trial.model, trial.tokenizer, pools["val"], spec, rank, world, device)
        acc = {task: s["primary"] for task, s in scores.items()}  # each task's primary metric: what choices read
        test = {}
        if done == steps and pools["test"]:
            test_scores, _, test_items = evaluate_sharded(trial.model, trial.tokenizer, pools["test"], spec, rank,
                                                          world, device)
            test = test_metrics(test_scores, test_items)
            test.update(scoring_record(pools["test"], spec))  # the items and formulation these scores belong to
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
        **divergence, **eval_metrics(acc, util, reference, progress.history, scores=scores), **test,
        **trial.precision.record(), **trial.eval_precision.record("eval_"),
        "val/best_mean_acc": max([mean_of(acc), *map(mean_of, progress.history)]),
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


def checkpoint_and_report(session: Any, trial: TrialModel, optim: Optimisation, progress: Progress,
                          metrics: dict[str, Any], out: list[dict[str, Any]]) -> None:
    """Rank 0 writes the adapter and the training state to a checkpoint; every rank reports (Train needs all)."""
    from malora.checkpoint import save_adapter

    core = trial.model
    with tempfile.TemporaryDirectory(prefix="malora-ckpt-") as tmp:
        ckpt_dir = None
        if session.rank == 0:
            save_adapter(core, trial.adapter, Path(tmp) / ADAPTER_DIR)
            torch.save({"step": progress.step, "tokens": progress.tokens, "history": progress.history,
                        "optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict(),
                        "adapter": {n: p.detach() for n, p in core.named_parameters() if p.requires_grad}},
                       Path(tmp) / TRAIN_STATE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=1))
            ckpt_dir = tmp
            out.append(metrics)
        session.report(metrics, ckpt_dir)


def evaluate_sharded(model: torch.nn.Module, tokenizer: Any, eval_by_task: dict[str, list], spec: SearchSpec,
                     rank: int, world: int, device: torch.device
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict], dict[str, dict[str, list[int]]]]:
    """Per-task accuracy and routing fractions, each rank scoring items[rank::world], summed over ranks.

    Routing: every rank's raw token-slot counts per expert are summed over the ranks and then normalised, so the
    share is exact over all real tokens (not a per-rank share weighted by items).
    Returns ({task: {"acc", "acc_norm", "primary"}}, {task: {layer path: fraction (N,) of token-slots per
    expert}}, {task: {"correct": 1/0, "chosen": option index}} per item in the order of ``eval_by_task[task]``,
    both under the task's primary metric). ``acc_norm`` is NaN where items are generated.
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
                                       formulation=formulation)[task]
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
            a = vec[0] / total if total else float("nan")
            a_norm = vec[1] / total if total and loglik else float("nan")
            acc[task] = {"acc": a, "acc_norm": a_norm, "primary": a_norm if primary == "acc_norm" else a}
    reset_routing_stats(model)
    return acc, util, per_item
